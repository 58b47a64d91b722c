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
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from duet.agents.backends import Backend, BackendError
from duet.app.errors import UsageProblem
from duet.errors import DuetError
from duet.evaluation.backend_options import backend_kind, backend_provider, options_for_run, redacted
from duet.evaluation.datasets import Shard, load_dataset, select
from duet.evaluation.modes import Context, parse_modes
from duet.evaluation.pool import execute
from duet.evaluation.progress import Progress
from duet.evaluation.provenance import (
    fingerprint,
    fingerprint_changes,
    fingerprint_hash,
    git_commit,
    model_identity,
    now,
    prompts_sha,
    versions,
)
from duet.evaluation.results import Loaded, ResultsFile, read_records, write_json_atomic
from duet.evaluation.run_types import EvalOptions, Outcome, Prepared, Say
from duet.evaluation.runlock import RunLock

RUN_FORMAT = "duet-eval/1"
DEFAULT_CONCURRENCY = {"local": 8, "openai": 16}
MAX_WARNINGS = 10


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
    solver_options = options_for_run(opts.backend, opts.backend_options, concurrency)
    critic_options = None
    if opts.critic_backend:
        own = opts.critic_options if opts.critic_options is not None else opts.backend_options
        critic_options = options_for_run(opts.critic_backend, own, concurrency)
    fp = fingerprint(data, opts, prompts_sha(prompts), solver_id, critic_id,
                     {"solver": solver_options, "critic": critic_options})
    digest = fingerprint_hash(fp)
    run_dir = opts.out or Path("runs") / "eval" / f"{data.path.stem}-{digest}"
    if opts.out is None:  # a given --out was checked before the data was read
        _check_run_dir(run_dir, False)
    config = {
        "format": RUN_FORMAT,
        "created": now(),
        "argv": sys.argv,
        "versions": versions(),
        "git": git_commit(),
        "data": {"path": str(data.path.resolve()), "sha256": data.sha256, "format": data.format,
                 "rows": data.rows, "usable": len(data.problems), "malformed": len(data.issues),
                 "fields": dataclasses.asdict(opts.fields)},
        "selection": {"limit": opts.limit, "shuffle": opts.shuffle, "seed": opts.seed,
                      "shard": str(shard) if shard else None, "selected": len(problems)},
        "modes": [m.name for m in modes],
        "concurrency": concurrency,
        "dialogue": opts.dialogue.to_dict(),
        "sc_temperature": opts.sc_temperature,
        "backends": {"solver": {"spec": opts.backend, "options": redacted(solver_options)},
                     "critic": {"spec": opts.critic_backend, "options": redacted(critic_options)}
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
            started = now()
            progress = Progress(prep.modes, totals, prior, live=live, say=say, console=console)
            cache_before = _prefix_cache_stats(prep)
            with progress:
                outcome.completed, outcome.interrupted, outcome.aborted = execute(prep, tasks, results, progress,
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
    for role, now_ in after.items():
        old = before.get(role, {})
        d = {k: now_[k] - old.get(k, 0) for k in ("requests", "hits", "prompt_tokens", "reused_tokens",
                                                  "stored_blocks", "evicted_blocks")}
        d["hit_rate"] = round(d["reused_tokens"] / d["prompt_tokens"], 4) if d["prompt_tokens"] else 0.0
        d.update({k: now_[k] for k in ("blocks", "held_bytes", "capacity_bytes")})
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




def _log_invocation(prep: Prepared, outcome: Outcome, started: str) -> None:
    entry = {"started": started, "ended": now(), "argv": sys.argv, "selection": prep.config["selection"],
             "modes": prep.config["modes"], "concurrency": prep.concurrency, "skipped_done": outcome.skipped_done,
             "completed": outcome.completed, "interrupted": outcome.interrupted, "aborted": outcome.aborted,
             "versions": prep.config["versions"], "git": prep.config["git"]}
    with open(prep.run_dir / "invocations.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, default=str) + "\n")
        handle.flush()
        with contextlib.suppress(OSError):
            os.fsync(handle.fileno())
