"""`--backend-option` (`-O`) values: parsed and checked against each backend's options, and backends built."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

from duet.agents.backends import Backend, ScriptedBackend, backend_kinds, make_backend, option_kinds, options_schema
from duet.app.errors import UsageProblem


def allowed_options(kind: str) -> dict[str, str] | None:
    """``{option: kind of value}`` that backend ``kind`` takes (its option schema, see
    ``duet.agents.backends.option``); None for a kind without one (its options pass through unchecked)."""
    schema = options_schema(kind)
    return None if schema is None else option_kinds(schema)


def _schemas() -> dict[str, type]:
    """The option schema of every registered backend kind that has one."""
    return {k: schema for k in backend_kinds() if (schema := options_schema(k)) is not None}


def options_help() -> str:
    """The keys of every backend kind, for ``--backend-option``'s help: ``local: device, ...; openai: ...``."""
    hints = {"object": " (JSON)", "MiB or 0": " (MiB, 0: off)"}
    return "; ".join(f"{kind}: " + ", ".join(f"{name}{hints.get(k, '')}" for name, k in option_kinds(schema).items())
                     for kind, schema in _schemas().items())


def not_answer_affecting() -> set[str]:
    """Backend options that change speed or failures, not answers (``option(..., answers=False)``)."""
    return {f.name for schema in _schemas().values() for f in dataclasses.fields(schema) if not f.metadata["answers"]}


def parse_backend_options(items: list[str], specs: list[str | None] | None = None) -> dict[str, Any]:
    """``["delay=0.5", "api_key=x"]`` -> ``{"delay": 0.5, "api_key": "x"}``, checked against the backends of
    ``specs`` (the solver's and the critic's; None: any registered kind with an option schema).

    A key no backend of the run takes, or a value of the wrong kind, is a UsageProblem (exit 2) naming the key
    and the keys allowed. Text options take the value as written; the others read it as JSON.
    """
    kinds = sorted({backend_kind(s) for s in specs if s}) if specs else list(_schemas())
    schemas = [allowed_options(k) for k in kinds]
    if any(schema is None for schema in schemas):
        allowed = None  # a backend registered without a schema: its options pass through unchecked
    else:
        allowed = {key: kind for schema in schemas for key, kind in schema.items()}
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
    """``text`` as an option value of ``kind`` (``duet.agents.backends.OPTION_KINDS``; None: JSON if it parses,
    else the text)."""
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
    if kind in ("count", "count or 0"):
        least = 0 if kind == "count or 0" else 1
        if isinstance(value, int) and not isinstance(value, bool) and value >= least:
            return value
        raise UsageProblem(f"--backend-option {key}={text}: expected a whole number >= {least}")
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
    known = allowed_options(backend_kind(spec))
    return dict(options) if known is None else {k: v for k, v in options.items() if k in known}


def backend_kind(spec: str) -> str:
    return spec.partition(":")[0]


def options_for_run(spec: str, options: dict[str, Any], concurrency: int) -> dict[str, Any]:
    """make_backend options: for local, the engine's batch is the concurrency, and "auto" device, dtype and mtp
    are resolved here (so the run's identity says what ran)."""
    options = dict(options)
    if backend_kind(spec) == "local":
        from duet.app.backends import resolve_local

        options.setdefault("max_batch", concurrency)
        options = resolve_local(options)
    return options


def redacted(options: dict[str, Any]) -> dict[str, Any]:
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
