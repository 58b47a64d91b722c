"""Running an evaluation: the run directory, its identity, resume, and the pool of concurrent dialogues.

A run directory holds::

    config.json       every option, versions, git commit, the data file's hash, and the fingerprint
    model.json        the identity of the solver and critic models (spec, checkpoint, weights hash)
    results.jsonl     one record per (problem, mode), appended and fsynced one at a time
    transcripts/      <mode>/<id>.json: the whole dialogue(s) of each record
    summary.json      the per-mode numbers (rewritten at the end of every invocation, also after Ctrl-C)
    invocations.jsonl one line per `duet eval` into this directory (argv, selection, counts, time)

Resume: running again into the same directory skips every (id, mode) already in results.jsonl. The
*fingerprint* (options that change answers: data file content and fields, models, dialogue limits,
temperature, seed, prompts, backend options) must match the one in config.json, else the run stops with
a one-line error naming what changed. Options that only choose which problems run or how fast
(``--limit``, ``--shuffle``, ``--shard``, ``--modes``, ``--concurrency``) may change between invocations.
The default ``--out`` is ``runs/eval/<data name>-<fingerprint hash>``, so the same command resumes and a
changed option starts a new directory. A lock file keeps two processes out of one directory.

Concurrency: ``--concurrency`` threads each run one dialogue at a time. Against one local backend their
requests are decoded together by the engine (continuous batching across problems); against an
OpenAI-compatible server they are concurrent HTTP requests. Scripted backends keep per-conversation state,
so each dialogue gets its own copy. Problems run mode by mode (all of the first mode, then the next), so
each mode's throughput is measured on its own.

A broken backend stops the run early: when the first ``max(4, concurrency)`` results of an invocation are
all errors (backend, sandbox or duet eval's own), the run stops (``Outcome.aborted`` holds the error) instead
of recording an error for every problem; what was recorded stays, and ``--retry-errors`` runs it again.
Ctrl-C abandons the problems in flight (they are not recorded, so they run again on resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import platform
import queue
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from duet.agents.backends import Backend, BackendError, ScriptedBackend, make_backend
from duet.agents.dialogue import DialogueConfig
from duet.errors import DuetError
from duet.evaluation.datasets import Dataset, Fields, Problem, Shard, load_dataset, select
from duet.evaluation.modes import Context, Interrupted, Mode, error_record, parse_modes, run_problem
from duet.evaluation.results import Loaded, ResultsFile, ordered, read_records, transcript_path, write_json_atomic
from duet.ui.errors import UsageProblem

RUN_FORMAT = "duet-eval/1"
DEFAULT_CONCURRENCY = {"local": 8, "openai": 16}
MAX_WARNINGS = 10
NOT_ANSWER_AFFECTING = ("max_batch", "compile", "prefix_cache_mb", "timeout", "delay", "api_key")
"""Backend options left out of the fingerprint: they change speed or failures, not answers."""
MIN_ABORT_STREAK = 4
"""The run stops when its first max(this, concurrency) results are all errors (a broken backend)."""

BACKEND_OPTIONS: dict[str, dict[str, str]] = {
    "local": {"device": "text", "dtype": "text", "mtp": "bool", "compile": "bool", "max_batch": "count",
              "max_seq_len": "count", "prefix_cache_mb": "MiB or 0"},
    "openai": {"timeout": "seconds", "api_key": "text", "extra_body": "object"},
    "scripted": {"delay": "seconds or 0", "timeout": "seconds"},
}
"""The ``--backend-option`` / ``-O`` keys each backend kind takes, and the kind of value (see _option_value).
A backend kind registered elsewhere (not listed) gets every option as given."""


@dataclass
class EvalOptions:
    """Every option of ``duet eval run`` (the CLI fills one; tests may build one directly)."""

    data: Path
    out: Path | None = None
    backend: str = "local:"
    critic_backend: str | None = None
    modes: str = "solver+critic"
    fields: Fields = field(default_factory=Fields)
    format: str | None = None
    limit: int | None = None
    shuffle: bool = False
    seed: int = 0
    shard: str | None = None
    strict: bool = False
    concurrency: int | None = None
    dialogue: DialogueConfig = field(default_factory=DialogueConfig)
    sc_temperature: float = 0.7
    backend_options: dict[str, Any] = field(default_factory=dict)  # make_backend options of the solver
    critic_options: dict[str, Any] | None = None  # ... of the critic (None: the solver's)
    retry_errors: bool = False


@dataclass
class Outcome:
    """What an invocation did."""

    run_dir: Path
    selected: int = 0
    skipped_done: int = 0
    completed: int = 0
    interrupted: bool = False
    aborted: str | None = None  # the error that stopped the run early (every result so far failed)
    summary: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)


Say = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------
# Backends


def parse_backend_options(items: list[str], specs: list[str | None] | None = None) -> dict[str, Any]:
    """``["delay=0.5", "api_key=x"]`` -> ``{"delay": 0.5, "api_key": "x"}``, checked against the backends of
    ``specs`` (the solver's and the critic's; None: any kind of :data:`BACKEND_OPTIONS`).

    A key no backend of the run takes, or a value of the wrong kind, is a UsageProblem (exit 2) naming the key
    and the keys allowed. Text options take the value as written; the others read it as JSON.
    """
    kinds = sorted({backend_kind(s) for s in specs if s}) if specs else sorted(BACKEND_OPTIONS)
    if any(kind not in BACKEND_OPTIONS for kind in kinds):
        allowed = None  # a backend registered elsewhere: its options pass through unchecked
    else:
        allowed = {key: kind for k in kinds for key, kind in BACKEND_OPTIONS[k].items()}
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageProblem(f"--backend-option {item!r}: expected KEY=VALUE, e.g. -O timeout=120")
        if allowed is not None and key not in allowed:
            raise UsageProblem(f"--backend-option {key}: not an option of the {' and '.join(kinds)} backend; "
                               f"use one of: {', '.join(sorted(allowed))}")
        options[key] = _option_value(key, value, allowed[key] if allowed is not None else None)
    return options


def _option_value(key: str, text: str, kind: str | None) -> Any:
    """``text`` as an option value of ``kind`` (None: JSON if it parses, else the text)."""
    if kind == "text":
        if not text.strip():
            raise UsageProblem(f"--backend-option {key}: empty value")
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if kind is None:
        return value
    if kind == "bool":
        words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False,
                 "0": False}
        if isinstance(value, bool):
            return value
        if text.strip().lower() in words:
            return words[text.strip().lower()]
        raise UsageProblem(f"--backend-option {key}={text}: expected true or false")
    if kind == "count":
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        raise UsageProblem(f"--backend-option {key}={text}: expected a whole number >= 1")
    if kind in ("seconds", "seconds or 0", "MiB or 0"):
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if number is None or not math.isfinite(number) or number < 0 or (number == 0 and kind == "seconds"):
            least = ">= 0" if kind != "seconds" else "> 0"
            raise UsageProblem(f"--backend-option {key}={text}: expected a number of {kind.split()[0]} {least}")
        return number
    if kind == "object":
        if isinstance(value, dict):
            return value
        raise UsageProblem(f"--backend-option {key}={text}: expected a JSON object, e.g. {key}='{{\"top_p\": 0.9}}'")
    raise AssertionError(kind)


def options_for_backend(spec: str, options: dict[str, Any]) -> dict[str, Any]:
    """The ``--backend-option`` values the backend of ``spec`` takes (the solver's and the critic's may differ)."""
    known = BACKEND_OPTIONS.get(backend_kind(spec))
    return dict(options) if known is None else {k: v for k, v in options.items() if k in known}


def backend_kind(spec: str) -> str:
    return spec.partition(":")[0]


def _options_for(spec: str, options: dict[str, Any], concurrency: int) -> dict[str, Any]:
    """make_backend options: for local, the engine's batch is the concurrency, and "auto" device, dtype and mtp
    are resolved here (so the run's identity says what ran)."""
    options = dict(options)
    if backend_kind(spec) == "local":
        from duet.ui.session import resolve_local

        options.setdefault("max_batch", concurrency)
        options = resolve_local(options)
    return options


def _redacted(options: dict[str, Any]) -> dict[str, Any]:
    """Options as written to config.json: secrets replaced."""
    def secret(key: str) -> bool:
        key = key.lower()
        return key in ("key", "token", "password", "secret") or key.endswith(("_key", "_token", "_secret"))

    return {k: ("***" if secret(k) else v) for k, v in options.items()}


def backend_provider(spec: str, options: dict[str, Any]) -> tuple[Callable[[], Backend], Backend]:
    """Build the backend now (errors surface before any work) and a provider of one per dialogue."""
    backend = make_backend(spec, **options)
    if isinstance(backend, ScriptedBackend):  # per-conversation state: one copy per dialogue
        return (lambda: dataclasses.replace(backend, calls=[])), backend
    return (lambda: backend), backend


# ---------------------------------------------------------------------------------------------------
# Identity


def model_identity(spec: str) -> dict[str, Any]:
    """What a backend spec points at: for ``local:`` the checkpoint path and a hash of its files (no loading)."""
    kind, _, argument = spec.partition(":")
    identity: dict[str, Any] = {"spec": spec, "kind": kind}
    if kind == "local":
        if argument:
            path = Path(argument).expanduser()
        else:  # (duet.model imports torch: only for the embedded model)
            from duet.model.embedded import default_model_path

            path = default_model_path()
        identity.update(checkpoint_identity(path))
        identity["embedded"] = not argument
    elif kind == "scripted":
        path = Path(argument)
        identity["path"] = str(path.resolve())
        identity["sha256"] = _file_sha256(path)
    elif kind == "openai":
        url, _, model = argument.partition("#")
        identity.update(base_url=url, model=model or None)
    return identity


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CONTENT_HASH_LIMIT = 512 * 2**20  # weights up to this size are hashed by content, larger ones by size+mtime


def checkpoint_identity(path: Path) -> dict[str, Any]:
    """Checkpoint path, its small files' content, and its weights (content hash when small, else size+mtime)."""
    path = path.resolve()
    if not path.is_dir():
        return {"checkpoint": str(path), "fingerprint": None}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    weights = [p for p in files if p.suffix in _WEIGHT_SUFFIXES]
    total = sum(p.stat().st_size for p in weights)
    by_content = total <= CONTENT_HASH_LIMIT
    digest = hashlib.sha256()
    listed = []
    for p in files:
        rel = str(p.relative_to(path))
        stat = p.stat()
        digest.update(rel.encode() + b"\0")
        if p in weights and not by_content:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        elif p in weights or stat.st_size <= 16 * 2**20:
            digest.update(_file_sha256(p).encode())
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        if p in weights:
            listed.append({"file": rel, "bytes": stat.st_size})
    return {"checkpoint": str(path), "fingerprint": "sha256:" + digest.hexdigest(),
            "fingerprint_method": "content" if by_content else "content (small files) + weights size/mtime",
            "weights": listed, "weights_bytes": total}


def _file_sha256(path: Path) -> str | None:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


def _identity_key(identity: dict[str, Any] | None) -> dict[str, Any] | None:
    if identity is None:
        return None
    keep = ["kind", "checkpoint", "fingerprint", "sha256", "base_url", "model"]
    if identity.get("kind") not in ("local", "scripted"):  # the path and content hash identify those
        keep.insert(0, "spec")
    return {k: identity[k] for k in keep if k in identity}


def fingerprint(
    data: Dataset, opts: EvalOptions, prompts_sha: str, solver: dict, critic: dict | None,
    options: dict[str, dict[str, Any] | None],
) -> dict[str, Any]:
    """The options that change answers; a run directory only accepts invocations with the same ones."""
    dialogue = opts.dialogue.to_dict()
    dialogue.pop("prompt_dir", None)
    dialogue.pop("seed", None)
    backend_options = {who: {k: v for k, v in sorted(o.items()) if k not in NOT_ANSWER_AFFECTING}
                       for who, o in options.items() if o is not None}
    return {
        "data_sha256": data.sha256,
        "data_format": data.format,
        "fields": dataclasses.asdict(opts.fields),
        "solver": _identity_key(solver),
        "critic": _identity_key(critic),
        "dialogue": dialogue,
        "prompts_sha256": prompts_sha,
        "seed": opts.seed,
        "sc_temperature": opts.sc_temperature,
        "backend_options": backend_options,
    }


def fingerprint_hash(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["dialogue.max_rounds: 3 -> 4", ...]`` for every leaf that differs."""
    a, b = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            old_v, new_v = a.get(key), b.get(key)
            if isinstance(old_v, str) and len(old_v) > 24:
                old_v, new_v = "…" + old_v[-12:], ("…" + new_v[-12:]) if isinstance(new_v, str) else new_v
            changes.append(f"{key}: {old_v} -> {new_v}")
    return changes


def _prompts_sha(prompts: Any) -> str:
    texts = json.dumps(dataclasses.asdict(prompts), sort_keys=True)
    return hashlib.sha256(texts.encode()).hexdigest()


def _git_commit() -> dict[str, Any] | None:
    root = Path(__file__).resolve().parent.parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        if not commit:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    from duet import __version__

    out: dict[str, str | None] = {"duet": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "typer", "rich", "sympy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------
# The run


class RunLock:
    """An exclusive ``flock`` on ``<run>/.lock`` (released by the kernel if the process dies)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise DuetError(
                f"another `duet eval` is writing into {self.path.parent}; wait for it or use another --out"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@dataclass
class Prepared:
    """Everything decided before the first dialogue starts."""

    options: EvalOptions
    data: Dataset
    problems: list[Problem]
    modes: list[Mode]
    run_dir: Path
    config: dict[str, Any]
    context: Context
    concurrency: int
    solver_options: dict[str, Any] = field(default_factory=dict)
    critic_options: dict[str, Any] | None = None


def prepare(opts: EvalOptions, say: Say) -> Prepared:
    """Load and check the data, build the backends, and decide the run directory (no work yet)."""
    from duet.prompts import PromptError, load_prompts

    if opts.out is not None:
        _check_run_dir(Path(opts.out), True)
    modes = parse_modes(opts.modes)
    shard = Shard.parse(opts.shard) if opts.shard else None
    if opts.concurrency is not None and opts.concurrency < 1:
        raise UsageProblem(f"--concurrency {opts.concurrency}: must be >= 1")
    if opts.limit is not None and opts.limit < 0:
        raise UsageProblem(f"--limit {opts.limit}: must be >= 0")
    data = load_dataset(opts.data, opts.fields, fmt=opts.format)
    if data.issues:
        if opts.strict:
            listed = "; ".join(str(i) for i in data.issues[:3])
            more = f" (and {len(data.issues) - 3} more)" if len(data.issues) > 3 else ""
            raise DuetError(f"{len(data.issues)} malformed row(s) of {data.rows}, stopping (--strict): {listed}{more}")
        for issue in data.issues[:MAX_WARNINGS]:
            say(f"warning: {issue}; skipped")
        if len(data.issues) > MAX_WARNINGS:
            say(f"warning: ... and {len(data.issues) - MAX_WARNINGS} more malformed rows")
        say(f"warning: skipped {len(data.issues)} malformed row(s) of {data.rows} in {data.path}")
    problems = select(data.problems, limit=opts.limit, shuffle=opts.shuffle, seed=opts.seed, shard=shard)
    if not problems:
        raise DuetError("no problems selected (check --limit and --shard)")
    try:
        prompts = load_prompts(opts.dialogue.prompt_dir)
    except PromptError as error:
        raise DuetError(str(error)) from None
    concurrency = opts.concurrency or DEFAULT_CONCURRENCY.get(backend_kind(opts.backend), 8)
    for spec in (opts.backend, opts.critic_backend):
        if spec is not None and ":" not in spec:
            raise DuetError(f"unknown backend {spec!r}; use local:[DIR], openai:URL[#MODEL] or scripted:FILE.json")
    solver_id = model_identity(opts.backend)
    critic_id = model_identity(opts.critic_backend) if opts.critic_backend else None
    solver_options = _options_for(opts.backend, opts.backend_options, concurrency)
    critic_options = None
    if opts.critic_backend:
        own = opts.critic_options if opts.critic_options is not None else opts.backend_options
        critic_options = _options_for(opts.critic_backend, own, concurrency)
    fp = fingerprint(data, opts, _prompts_sha(prompts), solver_id, critic_id,
                     {"solver": solver_options, "critic": critic_options})
    digest = fingerprint_hash(fp)
    run_dir = opts.out or Path("runs") / "eval" / f"{data.path.stem}-{digest}"
    if opts.out is None:  # a given --out was checked before the data was read
        _check_run_dir(run_dir, False)
    config = {
        "format": RUN_FORMAT,
        "created": _now(),
        "argv": sys.argv,
        "versions": _versions(),
        "git": _git_commit(),
        "data": {"path": str(data.path.resolve()), "sha256": data.sha256, "format": data.format,
                 "rows": data.rows, "usable": len(data.problems), "malformed": len(data.issues),
                 "fields": dataclasses.asdict(opts.fields)},
        "selection": {"limit": opts.limit, "shuffle": opts.shuffle, "seed": opts.seed,
                      "shard": str(shard) if shard else None, "selected": len(problems)},
        "modes": [m.name for m in modes],
        "concurrency": concurrency,
        "dialogue": opts.dialogue.to_dict(),
        "sc_temperature": opts.sc_temperature,
        "backends": {"solver": {"spec": opts.backend, "options": _redacted(solver_options)},
                     "critic": {"spec": opts.critic_backend, "options": _redacted(critic_options)}
                     if critic_options is not None else None},
        "model": {"solver": solver_id, "critic": critic_id},
        "fingerprint": fp,
        "fingerprint_sha256": digest,
    }
    context = Context(solver=_unbuilt, critic=lambda: None, config=opts.dialogue, prompts=prompts,
                      seed=opts.seed, sc_temperature=opts.sc_temperature, cancel=threading.Event())
    return Prepared(opts, data, problems, modes, Path(run_dir), config, context, concurrency,
                    solver_options, critic_options)


def _unbuilt() -> Backend:
    raise RuntimeError("the backends were not built (build_backends)")


def build_backends(prep: Prepared) -> None:
    """Load the models / connect (only when there is work: a finished run resumes without loading them)."""
    opts = prep.options
    try:
        solver, backend = backend_provider(opts.backend, prep.solver_options)
        prep.context.solver = solver
        prep.config["model"]["solver"]["name"] = getattr(backend, "name", None)
        if opts.critic_backend:
            critic, backend = backend_provider(opts.critic_backend, prep.critic_options or {})
            prep.context.critic = critic
            prep.config["model"]["critic"]["name"] = getattr(backend, "name", None)
    except BackendError as error:
        raise DuetError(str(error)) from None


def _check_config(prep: Prepared) -> bool:
    """True when resuming; refuses a run directory made with different answer-affecting options."""
    path = prep.run_dir / "config.json"
    if not path.exists():
        if (prep.run_dir / "results.jsonl").exists():
            raise DuetError(f"{prep.run_dir} has results.jsonl but no config.json; use a new --out")
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DuetError(f"{path}: unreadable ({error}); use a new --out") from None
    if old.get("fingerprint") != prep.config["fingerprint"]:
        changes = fingerprint_changes(old.get("fingerprint") or {}, prep.config["fingerprint"])
        shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        raise DuetError(
            f"{prep.run_dir} holds a run with different answer-affecting options ({shown}); "
            "rerun with the same options to resume, or use a new --out"
        )
    prep.config["model"] = old.get("model", prep.config["model"])
    return True


class Progress:
    """Progress display: a rich bar per mode on a terminal, else a line every ~10% (or 30 s)."""

    def __init__(self, modes: list[Mode], totals: dict[str, int], done: dict[str, list[bool]], *,
                 live: bool, say: Say, console: Any = None) -> None:
        self.totals, self.correct = totals, {m: sum(v) for m, v in done.items()}
        self.count = {m: len(v) for m, v in done.items()}
        self.say, self.live = say, live
        self.started = time.monotonic()
        self.start_count = dict(self.count)
        self.last_line = 0.0
        self.bar = None
        if live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("acc {task.fields[acc]}"), TextColumn("ETA"), TimeRemainingColumn(),
                                TimeElapsedColumn(), console=console, transient=False)
            self.tasks = {m.name: self.bar.add_task(m.name, total=totals[m.name], completed=self.count[m.name],
                                                    acc=self._acc(m.name)) for m in modes}

    def _acc(self, mode: str) -> str:
        n = self.count[mode]
        return f"{self.correct[mode] / n:.3f}" if n else "-"

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def advance(self, mode: str, correct: bool) -> None:
        self.count[mode] += 1
        self.correct[mode] += bool(correct)
        if self.bar is not None:
            self.bar.update(self.tasks[mode], advance=1, acc=self._acc(mode))
            return
        total = self.totals[mode]
        step = max(1, total // 10)
        now = time.monotonic()
        if self.count[mode] % step == 0 or self.count[mode] == total or now - self.last_line > 30:
            self.last_line = now
            new = sum(self.count.values()) - sum(self.start_count.values())
            left = sum(self.totals.values()) - sum(self.count.values())
            eta = (now - self.started) / new * left if new else 0.0
            self.say(f"[{mode}] {self.count[mode]}/{total} done, accuracy {self._acc(mode)}, ETA {eta:.0f} s")


def run_eval(opts: EvalOptions, *, say: Say | None = None, live: bool = False, console: Any = None) -> Outcome:
    """Run (or resume) an evaluation; returns what happened. Ctrl-C ends it cleanly (``interrupted``)."""
    from duet.evaluation.report import summarize

    say = say or (lambda line: print(line, file=sys.stderr))
    prep = prepare(opts, say)
    created = [d for d in (prep.run_dir, *prep.run_dir.parents) if not d.exists()]
    try:
        prep.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DuetError(f"{_run_dir_name(prep.run_dir, opts.out is not None)}: cannot create it: "
                        f"{error.strerror or error}") from None
    outcome = Outcome(prep.run_dir, selected=len(prep.problems))
    results = ResultsFile(prep.run_dir / "results.jsonl")
    with RunLock(prep.run_dir):
        resuming = _check_config(prep)
        cache_stats: dict[str, Any] = {}
        try:
            loaded = results.open() if resuming else None
            done = loaded.keys() if loaded else set()
            if loaded:
                _report_repairs(loaded, results.path, say)
                if opts.retry_errors:
                    done = _drop_errors(results, loaded, say)
            tasks = [(p, m) for m in prep.modes for p in prep.problems if (p.id, m.name) not in done]
            outcome.skipped_done = len(prep.problems) * len(prep.modes) - len(tasks)
            if tasks:
                build_backends(prep)
            if not resuming:
                write_json_atomic(prep.run_dir / "config.json", prep.config, indent=2)
                write_json_atomic(prep.run_dir / "model.json", prep.config["model"], indent=2)
                created = []
                loaded = results.open()
                say(f"run directory: {prep.run_dir}")
            else:
                _remove_stale_temporaries(prep.run_dir)
                say(f"resuming {prep.run_dir}: {outcome.skipped_done} of {len(prep.problems) * len(prep.modes)} "
                    "already done")
            selected_ids = {p.id for p in prep.problems}
            prior = {m.name: [bool(r.get("correct")) for r in loaded.records
                              if r["mode"] == m.name and r["id"] in selected_ids] for m in prep.modes}
            totals = {m.name: len(prep.problems) for m in prep.modes}
            started = _now()
            progress = Progress(prep.modes, totals, prior, live=live, say=say, console=console)
            cache_before = _prefix_cache_stats(prep)
            with progress:
                outcome.completed, outcome.interrupted, outcome.aborted = _execute(prep, tasks, results, progress,
                                                                                   say)
            cache_stats = _prefix_cache_delta(cache_before, _prefix_cache_stats(prep))
            _log_invocation(prep, outcome, started)
        finally:
            results.close()
            if created:  # a new run that failed before its config was written leaves nothing behind
                with contextlib.suppress(OSError):
                    (prep.run_dir / ".lock").unlink()
                for directory in created:
                    with contextlib.suppress(OSError):
                        directory.rmdir()
        records = read_records(results.path).records
        outcome.records = records
        outcome.summary = summarize(records, run_dir=prep.run_dir, config=prep.config,
                                    mode_order=[m.name for m in prep.modes])
        if cache_stats:
            outcome.summary["prefix_cache"] = cache_stats
        write_json_atomic(prep.run_dir / "summary.json", outcome.summary, indent=2)
    return outcome


def _prefix_cache_stats(prep: Prepared) -> dict[str, dict[str, Any]]:
    """The prefix-cache statistics of the local engines of this run, by role (one entry when solver and critic
    share an engine); empty without local engines or before they are built."""
    out: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for role, provider in (("solver", prep.context.solver), ("critic", prep.context.critic)):
        try:
            engine = getattr(provider(), "engine", None)
        except Exception:  # not built (nothing to run)
            continue
        stats = getattr(engine, "prefix_cache_stats", None)
        if callable(stats) and id(engine) not in seen and (value := stats()) is not None:
            seen.add(id(engine))
            out[role] = value
    return out


def _prefix_cache_delta(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """This invocation's share of the engines' counters (an engine may have served earlier runs in-process)."""
    out = {}
    for role, now in after.items():
        old = before.get(role, {})
        d = {k: now[k] - old.get(k, 0) for k in ("requests", "hits", "prompt_tokens", "reused_tokens",
                                                 "stored_blocks", "evicted_blocks")}
        d["hit_rate"] = round(d["reused_tokens"] / d["prompt_tokens"], 4) if d["prompt_tokens"] else 0.0
        d.update({k: now[k] for k in ("blocks", "held_bytes", "capacity_bytes")})
        out[role] = d
    return out


def _run_dir_name(run_dir: Path, given: bool) -> str:
    return f"--out {run_dir}" if given else f"the run directory {run_dir}"


def _check_run_dir(run_dir: Path, given: bool) -> None:
    """A path that exists must be a directory (a run's, or one to make a run in)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageProblem(f"{_run_dir_name(run_dir, given)}: exists and is not a run directory")


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files a killed run left behind (we hold the lock: no one else is writing them)."""
    for path in [*run_dir.glob("transcripts/*/.*.tmp"), run_dir / "results.jsonl.tmp"]:
        with contextlib.suppress(OSError):
            path.unlink()


def _report_repairs(loaded: Loaded, path: Path, say: Say) -> None:
    if loaded.torn_bytes:
        say(f"warning: {path}: dropped a torn last record ({loaded.torn_bytes} bytes, from an interrupted write)")
    if loaded.duplicates:
        say(f"warning: {path}: {loaded.duplicates} repeated record(s) ignored (the first of each is kept)")


def _drop_errors(results: ResultsFile, loaded: Loaded, say: Say) -> set[tuple[str, str]]:
    """Remove failed records from the file (atomically) so they run again; returns the keys still done."""
    from duet.evaluation.modes import FAILED

    keep = [r for r in loaded.records if r.get("stop_reason") not in FAILED]
    dropped = len(loaded.records) - len(keep)
    if dropped:
        results.rewrite(keep)
        loaded.records = keep
        say(f"--retry-errors: {dropped} failed record(s) will run again")
    return loaded.keys()


def _execute(prep: Prepared, tasks: list[tuple[Problem, Mode]], results: ResultsFile, progress: Progress,
             say: Say) -> tuple[int, bool, str | None]:
    """Run ``tasks`` on the pool; the calling thread is the only writer.

    Returns (completed, interrupted, aborted): ``aborted`` is the error that stopped the run when its first
    ``max(MIN_ABORT_STREAK, concurrency)`` results were all errors (a broken backend), else None.
    """
    from duet.evaluation.modes import FAILED

    ctx, run_dir = prep.context, prep.run_dir
    finished: queue.Queue[tuple[str, Any]] = queue.Queue()
    cancel = ctx.cancel
    assert cancel is not None
    in_flight = [0]
    count_lock = threading.Lock()

    def work(problem: Problem, mode: Mode) -> None:
        if cancel.is_set():
            finished.put(("skipped", None))
            return
        with count_lock:
            in_flight[0] += 1
        started = time.time()
        try:
            try:
                record, transcript = run_problem(problem, mode, ctx)
            except Interrupted:
                finished.put(("skipped", None))
                return
            except Exception as error:  # a bug or a failure outside the dialogue's own guards
                record = error_record(problem, mode, error)
                transcript = {"version": 1, "id": problem.id, "mode": mode.name, "question": problem.question,
                              "gold": problem.gold, "dialogues": [], "error": traceback.format_exc()}
            rel = transcript_path(mode.name, problem.id)
            write_json_atomic(run_dir / rel, transcript)
            record.update(transcript=rel, line=problem.line, started=round(started, 3),
                          finished=round(time.time(), 3))
            finished.put(("record", ordered(record)))
        except BaseException as error:  # cannot write the transcript (disk full, ...): stop the run
            finished.put(("fatal", error))
        finally:
            with count_lock:
                in_flight[0] -= 1

    completed = 0
    pending = len(tasks)
    interrupted = False
    aborted: str | None = None
    abort_after = max(MIN_ABORT_STREAK, prep.concurrency)
    failures: list[str] = []  # the errors of this invocation's results until the first success
    succeeded = False

    def abandoning() -> str:
        with count_lock:
            running = in_flight[0]
        return f"interrupted: abandoning {running} problem(s) in flight; they run again on resume"

    pool = ThreadPoolExecutor(max_workers=prep.concurrency, thread_name_prefix="duet-eval")
    try:
        for problem, mode in tasks:
            pool.submit(work, problem, mode)
        while pending:
            try:
                kind, value = finished.get(timeout=0.25)
            except queue.Empty:
                continue
            except KeyboardInterrupt:
                if not interrupted:
                    interrupted = True
                    cancel.set()
                    say(abandoning() + " (Ctrl-C again to stop now)")
                    continue
                raise
            pending -= 1
            if kind == "record":
                results.append(value)
                completed += 1
                progress.advance(value["mode"], bool(value.get("correct")))
                if not succeeded and value.get("stop_reason") in FAILED:
                    failures.append(str(value.get("error") or value.get("stop_reason")))
                    if len(failures) >= abort_after and not interrupted:
                        aborted = failures[0]
                        cancel.set()
                        break
                else:
                    succeeded = True
            elif kind == "fatal":
                cancel.set()
                raise DuetError(f"cannot write results into {run_dir}: {value}")
    except KeyboardInterrupt:
        cancel.set()
        if not interrupted:  # the first Ctrl-C, caught outside the wait for results
            say(abandoning())
        interrupted = True
    finally:
        pool.shutdown(wait=not (interrupted or aborted), cancel_futures=True)
    return completed, interrupted, aborted


def _log_invocation(prep: Prepared, outcome: Outcome, started: str) -> None:
    entry = {"started": started, "ended": _now(), "argv": sys.argv, "selection": prep.config["selection"],
             "modes": prep.config["modes"], "concurrency": prep.concurrency, "skipped_done": outcome.skipped_done,
             "completed": outcome.completed, "interrupted": outcome.interrupted, "aborted": outcome.aborted,
             "versions": prep.config["versions"], "git": prep.config["git"]}
    with open(prep.run_dir / "invocations.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, default=str) + "\n")
        handle.flush()
        with contextlib.suppress(OSError):
            os.fsync(handle.fileno())
