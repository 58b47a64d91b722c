"""From settings to running agents: backend specs, backends, the dialogue config, and runs Ctrl-C can stop.

Backend selection (the solver; the critic the same way with its ``critic_*`` keys):

* ``backend = "local"`` (the default): ``local:<model>``, the embedded default model when ``model`` is unset;
* ``backend = "openai"`` or ``base_url`` set: ``openai:<base_url>[#<model_name>]``;
* ``backend = "scripted:FILE"`` (or ``scripted`` with ``--replies FILE``; ``--replies FILE`` alone implies it, as
  ``base_url`` implies openai): replayed replies, for demos and tests. The JSON file may also hold ``"delay"``
  (seconds before each reply) and ``"timeout"``;
* any other ``kind:argument`` string is passed to ``make_backend`` as is.

The critic uses the solver's backend object unless one of its keys is set.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from duet.app.settings import Settings, SettingsError

T = TypeVar("T")


@dataclass
class Specs:
    """The backend spec strings of the solver and the critic (``critic=None``: the solver's backend)."""

    solver: str
    critic: str | None = None


def _spec(backend: str | None, model: str | None, base_url: str | None, model_name: str | None,
          replies: str | None, who: str) -> str:
    prefix = "critic_" if who == "critic" else ""
    kind = (backend or "").strip()
    if not kind:
        kind = "openai" if base_url else "local"
    if kind == "scripted":
        if not replies:
            raise SettingsError(f"--{prefix.replace('_', '-')}backend scripted needs --replies FILE")
        return f"scripted:{replies}"
    if kind == "openai":
        if not base_url:
            raise SettingsError(
                f"--{prefix.replace('_', '-')}backend openai needs --{prefix.replace('_', '-')}base-url URL "
                f"(or DUET_{prefix.upper()}BASE_URL)"
            )
        return f"openai:{base_url}" + (f"#{model_name}" if model_name else "")
    if kind == "local":
        return "local:" + (str(Path(model).expanduser()) if model else "")
    if ":" in kind:
        return kind
    raise SettingsError(f"unknown backend {kind!r}; use local, openai or scripted:FILE")


def backend_specs(settings: Settings, replies: str | None = None) -> Specs:
    """The solver's and the critic's backend specs from the effective settings."""
    s = settings
    if s.backend not in (None, "", "local") and s.sources.get("model") == "flag" and s.model:
        if not str(s.backend).startswith("local"):
            raise SettingsError("--model is a checkpoint directory for the local backend; "
                                "with --backend openai use --model-name")
    # backend's built-in default ("local") gives way to a base_url set anywhere, and to --replies FILE,
    # which also wins over a backend or base_url from the environment or the config file
    backend = s.backend if s.sources.get("backend", "default") != "default" else None
    if replies and backend != "scripted":
        given = [f"--{k.replace('_', '-')} {s.values[k]}" for k in ("backend", "base_url") if s.sources[k] == "flag"]
        if given:
            raise SettingsError(f"--replies FILE is for the scripted backend, not {given[0]}; drop one of them")
        backend = "scripted"
    solver = _spec(backend, s.model, s.base_url, s.model_name, replies, "solver")
    own = any(getattr(s, k) for k in ("critic_model", "critic_backend", "critic_base_url", "critic_model_name"))
    if not own:
        return Specs(solver, None)
    backend = s.critic_backend
    if not backend:
        # a critic model directory means the local runtime; a critic URL means a server; a bare
        # critic model name means the solver's server with another model
        if s.critic_model:
            backend = "local"
        elif s.critic_base_url:
            backend = "openai"
        else:
            backend = "openai" if solver.startswith("openai:") else solver
    base_url = s.critic_base_url or (s.base_url if backend == "openai" else None)
    critic = _spec(backend, s.critic_model, base_url, s.critic_model_name, replies, "critic")
    return Specs(solver, None if critic == solver else critic)


def backend_options(spec: str, settings: Settings) -> dict[str, Any]:
    """Keyword options for ``make_backend(spec, ...)``: those its option schema says a setting supplies (the local
    runtime's device, dtype, mtp, compile; a server's timeout), and a scripted backend's from its replies file."""
    from duet.agents.backends import option_kinds, option_settings, options_schema

    kind, _, argument = spec.partition(":")
    schema = options_schema(kind)
    if schema is None:
        return {}
    options = {}
    for name, (setting, unset) in option_settings(schema).items():
        given = settings.sources.get(setting, "default") != "default"
        options[name] = getattr(settings, setting) if given or unset is None else unset
    if kind == "scripted":
        try:
            data = json.loads(Path(argument).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # make_backend reports the problem in one line
        if isinstance(data, dict):  # its replies file may hold the options (delay, timeout) too
            options.update({k: float(data[k]) for k in option_kinds(schema) if isinstance(data.get(k), (int, float))})
    return options


def check_device(device: str, where: str = "--device") -> str:
    """``device`` ("auto": cuda when there is one, else cpu) if this machine has it; SettingsError (a usage
    error naming ``where``) if not. Imports torch."""
    from duet.app.settings import KEY_BY_NAME, convert

    device = convert(KEY_BY_NAME["device"], device, where)  # auto, cpu, cuda, cuda:N or mps
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            why = "this torch has no CUDA" if torch.version.cuda is None else "none is visible"
            raise SettingsError(f"{where} {device}: no CUDA device here ({why}); use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise SettingsError(f"{where} {device}: there are {count} CUDA device(s) here, cuda:0 to cuda:{count - 1}")
    if device == "mps" and not torch.backends.mps.is_available():
        raise SettingsError(f"{where} mps: no MPS device here (Apple silicon only); use --device cpu")
    return device


def resolve_local(options: dict[str, Any], where: str = "--device") -> dict[str, Any]:
    """``device``/``dtype``/``mtp`` "auto" resolved on this machine, the device checked (:func:`check_device`,
    errors naming ``where``); imports torch: only for local backends.

    ``mtp`` "auto" (not set anywhere) is on, except for compiled decoding on a CPU, where MTP made decoding
    slower (compiled + MTP ran at 0.45-0.7x compiled plain decoding in `duet bench --compile`)."""
    options = dict(options)
    options["device"] = check_device(options.get("device") or "auto", where)
    if options.get("dtype", "auto") == "auto":
        options["dtype"] = "bfloat16" if options["device"].startswith("cuda") else "float32"
    if options.get("mtp") == "auto":
        options["mtp"] = not (options.get("compile") and options["device"] == "cpu")
    return options


def build_backend(spec: str, settings: Settings) -> Any:
    """``make_backend(spec, **options)``; raises BackendError (one line) when it cannot be built, saying where a
    checkpoint directory from the environment or the config file came from."""
    from duet.agents.backends import BackendError, make_backend

    options = backend_options(spec, settings)
    if not spec.startswith("local:"):
        return make_backend(spec, **options)
    options = resolve_local(options, settings.where("device"))
    try:
        return make_backend(spec, **options)
    except BackendError as error:
        path = spec.partition(":")[2]
        for key in ("model", "critic_model"):
            value, (kind, _, origin) = settings.values[key], settings.sources[key].partition(" ")
            if value and kind in ("env", "file") and str(Path(value).expanduser()) == path and path in str(error):
                raise BackendError(f"{error} ({key}, from {origin})") from error
        raise


def build_backends(settings: Settings, specs: Specs) -> tuple[Any, Any | None]:
    """The solver's backend and the critic's (None: the critic shares the solver's)."""
    solver = build_backend(specs.solver, settings)
    critic = build_backend(specs.critic, settings) if specs.critic else None
    return solver, critic


SETTING_FOR_FIELD = {"sandbox_timeout": "timeout", "sandbox_memory_mb": "memory", "sandbox_isolation": "sandbox"}
"""The ``DialogueConfig`` fields whose setting has another name; the other fields share their setting's name."""


def dialogue_config(settings: Settings, **overrides: Any) -> Any:
    """The ``DialogueConfig`` the settings describe: every field that is also a setting, then ``overrides``."""
    from duet.agents.dialogue import DialogueConfig
    from duet.app.settings import KEY_BY_NAME

    values = {}
    for spec in fields(DialogueConfig):
        key = SETTING_FOR_FIELD.get(spec.name, spec.name)
        if key in KEY_BY_NAME:
            values[spec.name] = getattr(settings, key)
    if settings.sources.get("verify", "default") == "default":
        values["verify"] = None  # unset: on when a model answers, off for scripted replies
    return DialogueConfig(**{**values, **overrides})


def run_cancellable(
    work: Callable[[], T], cancel: threading.Event, on_interrupt: Callable[[int], None] | None = None
) -> T:
    """Run ``work`` in a worker thread; Ctrl-C sets ``cancel`` (and calls ``on_interrupt(count)``) instead
    of killing the process, and the call returns what ``work`` returns once it has wound down.

    While it waits, SIGINT has a handler that only counts (in the main thread, when Ctrl-C would raise
    KeyboardInterrupt at all): a KeyboardInterrupt raised inside the handling of an earlier one, by two
    Ctrl-Cs a millisecond apart, would escape while the work still runs. Elsewhere (another thread, or SIGINT
    ignored, as in a shell's background job) the wait catches KeyboardInterrupt itself."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["result"] = work()
        except BaseException as error:  # re-raised in the caller's thread
            box["error"] = error
        finally:
            done.set()

    interrupts: list[int] = []

    def on_sigint(signum: int, frame: Any) -> None:
        cancel.set()
        interrupts.append(signum)

    own_handler = (threading.current_thread() is threading.main_thread()
                   and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    previous = signal.signal(signal.SIGINT, on_sigint) if own_handler else None
    thread = threading.Thread(target=target, name="duet-dialogue", daemon=True)
    try:
        thread.start()
        shown = 0
        while not done.is_set():
            try:
                done.wait(0.05 if own_handler else None)  # with our handler, notices come at the next wake-up
            except KeyboardInterrupt:
                cancel.set()
                interrupts.append(signal.SIGINT)
            while shown < len(interrupts):
                shown += 1
                if on_interrupt is not None:
                    on_interrupt(shown)
    finally:
        if own_handler:
            signal.signal(signal.SIGINT, previous)
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
