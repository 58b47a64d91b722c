"""A run's identity: model and checkpoint hashes, the fingerprint of what changes answers, git and versions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from duet.evaluation.backend_options import not_answer_affecting
from duet.evaluation.datasets import Dataset
from duet.evaluation.run_types import EvalOptions


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
    ignored = not_answer_affecting()  # speed or failures, not answers
    backend_options = {who: {k: v for k, v in sorted(o.items()) if k not in ignored}
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


def prompts_sha(prompts: Any) -> str:
    texts = json.dumps(dataclasses.asdict(prompts), sort_keys=True)
    return hashlib.sha256(texts.encode()).hexdigest()


def git_commit() -> dict[str, Any] | None:
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


def versions() -> dict[str, str | None]:
    from importlib import metadata

    from duet import __version__

    out: dict[str, str | None] = {"duet": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "typer", "rich", "sympy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
