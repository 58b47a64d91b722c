"""The one small interface the agents talk to: chat messages in, text out.

A backend is any object with a ``name`` and a ``complete`` method (see :class:`Backend`).
Implementations:

* :class:`ScriptedBackend` (here): replays given replies, for tests and demos;
* :class:`duet.agents.openai_backend.OpenAIBackend`: any OpenAI-compatible server (vLLM, SGLang);
* ``duet.agents.local_backend``: duet's own runtime on a checkpoint (plugged in through the registry).

Contract of ``complete(messages, request, *, on_text, cancel)`` (``request``: a :class:`Request`):

* ``messages`` are ``{"role": "system" | "user" | "assistant", "content": str}`` dicts. When the last
  message has role ``"assistant"`` it is a *partial* reply to continue: the backend generates text
  that follows it, inside the same assistant turn (it does not close the turn or open a new one).
* Generation stops at end-of-turn / EOS, at ``request.max_tokens`` generated tokens, or at the first
  of the ``request.stop`` strings. The returned ``Completion.text`` never contains the stop string;
  ``Completion.stop_string`` says which one matched (``None`` when none did).
* ``finish_reason`` is one of :data:`FINISH_REASONS`: ``"stop"`` (a stop string matched),
  ``"eos"`` (the model ended its turn), ``"length"`` (``max_tokens`` reached) or ``"cancelled"``
  (``cancel`` was set; ``text`` holds what was generated so far).
* With ``request.logprobs = k > 0``, ``Completion.top_logprobs`` holds, for each generated token in
  order, the log-probabilities of the model's top ``k`` tokens there (text -> log-probability, the
  sampled token included); ``None`` where the backend cannot give them. ``Completion.token_logprobs``
  holds each generated token's own log-probability, always where the backend can give it cheaply (the
  local engine) and on a server when ``request.logprobs > 0``.
* A reasoning model's thinking (``<think>...</think>`` or a server's ``reasoning_content``) goes to
  ``Completion.reasoning``, never to ``text``.
* ``on_text`` receives the answer text as it is generated, in order, in pieces whose concatenation is
  ``text`` (stop strings are never streamed). ``cancel`` is checked between pieces.
* Failures (unreachable server, HTTP error, timeout, no model) raise :class:`BackendError` with a
  one-line message. Nothing else should escape; the dialogue still guards against it.
* Optional: ``concurrent = True`` says that ``complete`` may be called from many threads at once and
  serves those calls together (duet's engine batches them, a server takes them in parallel); the
  critic's own solutions then run beside the solver's turn instead of after it.
* Optional: ``model_backed = True`` says that a model answers (duet's engine, a server), not a script: the
  critic's verifier (``duet.agents.verifier``) is then on by default; it would desync scripted replies.

``make_backend(spec, **options)`` builds a backend from a string: ``scripted:<replies.json>``,
``openai:<base_url>[#<model>]``, ``local:<checkpoint dir>``; :func:`register_backend` adds kinds. Each kind
owns its option schema, a dataclass of :func:`option` fields (:class:`ScriptedOptions`, ``OpenAIOptions``,
``LocalOptions``): ``make_backend`` checks options against it, ``duet eval -O`` parses them by it, and the
settings that supply options (``device``, ``server_timeout``, ...) are named in it.
"""

from __future__ import annotations

import importlib
import json
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, Union, runtime_checkable

from duet.stops import StreamCutter

Message = dict[str, str]
"""A chat message: ``{"role": "system" | "user" | "assistant", "content": str}``."""

TextCallback = Callable[[str], None]

FINISH_REASONS = ("stop", "eos", "length", "cancelled")
"""Why a completion ended: stop string matched, end of turn, max_tokens reached, cancel set."""


class BackendError(Exception):
    """A backend failed (unreachable, HTTP error, timeout, bad reply). ``str(error)`` is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class ContextFullError(BackendError):
    """The conversation no longer fits the model's context window (it cannot be continued)."""


CONTEXT_FULL_HINTS = (
    "maximum context length",  # vLLM, SGLang, OpenAI
    "context length",  # SGLang: "is longer than the model's context length"
    "maximum model length",  # vLLM: "longer than the maximum model length of 2048"
    "exceeds the available context size",  # llama.cpp: "request (2484 tokens) exceeds the available context size"
    "exceed_context_size",  # llama.cpp's error type
    "context window",
    "too many tokens",
    "maximum sequence length",  # transformers: "longer than the specified maximum sequence length"
    "the context holds",  # duet's own runtime
)
"""Phrases (lower case) of servers' and duet's own errors for a prompt longer than the model's context."""


def is_context_full(message: str) -> bool:
    """True when an error message says the prompt does not fit the model's context."""
    lowered = message.lower()
    return any(hint in lowered for hint in CONTEXT_FULL_HINTS)


def one_line(text: str, limit: int = 300) -> str:
    """Collapse ``text`` to a single line of at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass(frozen=True)
class Request:
    """How to generate one completion: the parameters of a ``complete`` call besides the messages."""

    stop: tuple[str, ...] = ()
    max_tokens: int = 512
    temperature: float = 0.0
    seed: int | None = None
    logprobs: int = 0
    """How many top alternatives to return per generated token (``Completion.top_logprobs``); 0: none."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))  # a list is accepted, a tuple is kept


@dataclass
class Completion:
    """What one ``complete`` call produced."""

    text: str
    reasoning: str = ""
    finish_reason: str = "eos"
    stop_string: str | None = None
    stop_unknown: bool = False
    """``finish_reason`` is "eos" but may have been a stop string the server stripped without saying which
    (llama.cpp): the caller resolves it by its own rules."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    top_logprobs: list[dict[str, float]] | None = None
    """Per generated token, in order: token text -> log-probability of the top ``Request.logprobs``
    alternatives (the sampled token included); None when not asked for or the backend cannot give them."""
    token_logprobs: list[float] | None = None
    """Per generated token, in order: its log-probability under the model (temperature 1), however it was
    sampled; None when the backend cannot give them. The verifier reads the solver's confidence from them."""


@runtime_checkable
class Backend(Protocol):
    """What the agents need from a model. ``name`` identifies the model in logs and transcripts."""

    name: str

    def complete(
        self,
        messages: Sequence[Message],
        request: Request = Request(),
        *,
        on_text: TextCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> Completion:
        """Generate the assistant's reply to ``messages`` (or continue a partial last assistant message)."""
        ...


def is_continuation(messages: Sequence[Message]) -> bool:
    """True when the last message is a partial assistant reply that the backend must continue."""
    return bool(messages) and messages[-1].get("role") == "assistant"


_TOKEN = re.compile(r"\s*\S+")


def count_tokens(text: str) -> int:
    """A model-free token estimate: whitespace-separated pieces (used by the scripted backend)."""
    return len(_TOKEN.findall(text))


@dataclass
class Call:
    """One recorded ``ScriptedBackend.complete`` call (for assertions in tests)."""

    messages: list[Message]
    request: Request


Reply = Union[str, BaseException]
ReplySource = Union[Sequence[Reply], Callable[[list[Message]], Reply]]

_OUTPUT_FENCE_END = re.compile(r"^[ \t]*```[ \t]*$\n?", re.MULTILINE)


@dataclass
class ScriptedBackend:
    """A backend that replays scripted replies, honouring stop strings like a real model.

    A reply is a whole assistant turn as one string. When it contains a stop string (the solver stops
    at "```output"), the call returns the text before it with ``finish_reason="stop"``; the next call
    that *continues* the partial assistant message skips the scripted output block (from the stop
    string to its closing fence line, so placeholder outputs in scripts are ignored: duet inserts the
    real ones) and serves the rest, up to the next stop string. A reply that is an exception instance
    is raised instead (e.g. ``BackendError("down")``).

    Replies are chosen per new turn (a call whose last message is not an assistant message): first the
    ``match`` table (key: substring, else regex, searched in the last user message), then ``replies``
    in order (a sequence) or ``replies(messages)`` (a callable). Running out raises BackendError.

    ``delay`` waits that many seconds before each reply (checking ``cancel``); with ``timeout`` set and
    ``delay > timeout`` it waits ``timeout`` seconds and raises BackendError, like a server timing out.
    Tokens are whitespace-separated pieces; ``on_text`` receives one piece at a time. It has no
    log-probabilities to give (``top_logprobs`` is None).
    """

    replies: ReplySource = ()
    match: Mapping[str, Reply] | None = None
    name: str = "scripted"
    delay: float = 0.0
    timeout: float | None = None
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._next = 0
        self._pending: str | None = None  # rest of the reply being served, after a stop string

    def complete(
        self,
        messages: Sequence[Message],
        request: Request = Request(),
        *,
        on_text: TextCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> Completion:
        """Serve the next piece of the scripted reply (see the class docstring)."""
        started = time.perf_counter()
        messages = [dict(m) for m in messages]
        self.calls.append(Call(messages, request))
        stop, max_tokens = request.stop, request.max_tokens
        if self.delay > 0 and self._wait(cancel):
            return Completion("", finish_reason="cancelled", seconds=time.perf_counter() - started)
        if is_continuation(messages):
            source = self._skip_output_block(self._pending or "")
        else:
            source = self._choose(messages)
        self._pending = None
        cutter = StreamCutter(stop)
        cutter.feed(source)
        body = cutter.text
        finish = "stop" if cutter.stop_string is not None else "eos"
        if cutter.stop_string is not None:
            self._pending = source[len(body) :]
        pieces = _TOKEN.findall(body)
        if len(pieces) > max_tokens:
            pieces, finish, self._pending = pieces[:max_tokens], "length", None
            cutter.stop_string = None
        text = ""
        for piece in pieces:
            if cancel is not None and cancel.is_set():
                finish, self._pending, cutter.stop_string = "cancelled", None, None
                break
            text += piece
            if on_text is not None:
                on_text(piece)
        if finish in ("stop", "eos") and len(text) < len(body):  # trailing whitespace of the body
            tail = body[len(text) :]
            text += tail
            if on_text is not None:
                on_text(tail)
        prompt_tokens = sum(count_tokens(m.get("content", "")) for m in messages)
        return Completion(
            text=text,
            finish_reason=finish,
            stop_string=cutter.stop_string,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(pieces) if finish != "cancelled" else count_tokens(text),
            seconds=time.perf_counter() - started,
        )

    def _choose(self, messages: list[Message]) -> str:
        reply: Reply | None = None
        last_user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        for key, value in (self.match or {}).items():
            if key in last_user or _safe_search(key, last_user):
                reply = value
                break
        if reply is None:
            if callable(self.replies):
                reply = self.replies(messages)
            elif self._next < len(self.replies):
                reply = self.replies[self._next]
                self._next += 1
            else:
                raise BackendError(f"{self.name}: no scripted reply left (served {self._next})")
        if isinstance(reply, BaseException):
            raise reply
        return str(reply)

    @staticmethod
    def _skip_output_block(rest: str) -> str:
        found = _OUTPUT_FENCE_END.search(rest)
        return rest[found.end() :] if found else ""

    def _wait(self, cancel: threading.Event | None) -> bool:
        """Sleep ``delay`` (or ``timeout``, then raise); True when cancelled meanwhile."""
        wait = self.delay if self.timeout is None else min(self.delay, self.timeout)
        if (cancel or threading.Event()).wait(wait):
            return True
        if self.timeout is not None and self.delay > self.timeout:
            raise BackendError(f"{self.name}: no reply within {self.timeout:g} s")
        return False


def _safe_search(pattern: str, text: str) -> bool:
    try:
        return re.search(pattern, text, re.DOTALL) is not None
    except re.error:
        return False


# ---------------------------------------------------------------------------------------------
# Option schemas

OPTION_KINDS = ("text", "bool", "count", "count or 0", "seconds", "seconds or 0", "MiB or 0", "object")
"""The kinds of value a backend option takes: how ``duet eval -O key=value`` reads and checks it."""


def option(kind: str, default: Any = None, *, setting: str | None = None, unset: Any = None,
           answers: bool = True) -> Any:
    """One field of a backend's option schema (a dataclass; see :class:`ScriptedOptions`): the ``kind`` of value
    (:data:`OPTION_KINDS`) and its default. ``setting``: the duet setting that supplies it (``duet solve``,
    ``repl`` and ``eval`` pass the setting's value); ``unset``: what they pass while that setting is not set
    anywhere (None: its default); ``answers=False``: it changes speed or failures, never answers (an eval run's
    fingerprint leaves it out)."""
    if kind not in OPTION_KINDS:
        raise ValueError(f"option kind {kind!r}: use one of {', '.join(OPTION_KINDS)}")
    return field(default=default, metadata={"kind": kind, "setting": setting, "unset": unset, "answers": answers})


def option_kinds(schema: type) -> dict[str, str]:
    """``{option: kind}`` of a backend's option schema."""
    return {f.name: f.metadata["kind"] for f in fields(schema)}


def option_settings(schema: type) -> dict[str, tuple[str, Any]]:
    """``{option: (setting, value while unset)}`` for the options that a duet setting supplies."""
    return {f.name: (f.metadata["setting"], f.metadata["unset"]) for f in fields(schema) if f.metadata["setting"]}


@dataclass(frozen=True)
class ScriptedOptions:
    """The scripted backend's options (also read from the replies file by duet's commands)."""

    delay: float = option("seconds or 0", 0.0, answers=False)
    timeout: float | None = option("seconds", None, answers=False)


# ---------------------------------------------------------------------------------------------
# Registry and factory

BackendFactory = Callable[..., Backend]
"""``factory(argument: str, **options) -> Backend``; ``argument`` is the spec after ``kind:``."""

_REGISTRY: dict[str, tuple[BackendFactory | str, type | str | None]] = {
    "scripted": ("duet.agents.backends:scripted_from_spec", "duet.agents.backends:ScriptedOptions"),
    "openai": ("duet.agents.openai_backend:from_spec", "duet.agents.openai_backend:OpenAIOptions"),
    "local": ("duet.agents.local_backend:from_spec", "duet.agents.local_backend:LocalOptions"),
}


def register_backend(kind: str, factory: BackendFactory | str, options: type | str | None = None) -> None:
    """Register a backend kind: a factory, or ``"module:function"`` imported on first use, and its option schema
    (a dataclass of :func:`option` fields, or ``"module:Class"``; None: its options are not checked)."""
    _REGISTRY[kind] = (factory, options)


def backend_kinds() -> list[str]:
    """The registered backend kinds, e.g. ``["local", "openai", "scripted"]``."""
    return sorted(_REGISTRY)


def _load(kind: str, ref: Any) -> Any:
    """A registry entry, imported when it is a ``"module:attribute"`` string."""
    if not isinstance(ref, str):
        return ref
    module_name, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise BackendError(f"backend {kind!r} is not available: {error}") from error


def options_schema(kind: str) -> type | None:
    """The option schema of backend ``kind`` (None: an unknown kind, or one registered without a schema)."""
    return _load(kind, _REGISTRY[kind][1]) if kind in _REGISTRY else None


def make_backend(spec: str, **options: Any) -> Backend:
    """Build a backend from ``"kind:argument"``, e.g. ``"openai:http://127.0.0.1:8000/v1#deepseek-r1"``.

    Raises BackendError (one line) for an unknown kind, an option its schema does not have, or a factory
    that fails.
    """
    kind, sep, argument = spec.partition(":")
    if not sep or kind not in _REGISTRY:
        kinds = ", ".join(f"{k}:..." for k in backend_kinds())
        raise BackendError(f"unknown backend {spec!r}; use one of: {kinds}")
    factory, schema = (_load(kind, ref) for ref in _REGISTRY[kind])
    unknown = sorted(set(options) - set(option_kinds(schema))) if schema is not None else []
    if unknown:
        raise BackendError(f"backend {kind!r} has no option {unknown[0]!r}; use one of: "
                           f"{', '.join(sorted(option_kinds(schema)))}")
    try:
        return factory(argument, **options)
    except BackendError:
        raise
    except Exception as error:  # turned into a one-line error for the CLI
        raise BackendError(f"cannot create backend {spec!r}: {type(error).__name__}: {error}") from error


def scripted_from_spec(argument: str, **options: Any) -> ScriptedBackend:
    """``scripted:<file.json>``: a JSON list of replies, or ``{"replies": [...], "match": {...}}``."""
    path = Path(argument)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise BackendError(f"cannot read scripted replies {path}: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise BackendError(f"{path}: not valid JSON: {error}") from error
    if isinstance(data, list):
        data = {"replies": data}
    if not isinstance(data, dict) or not all(isinstance(r, str) for r in data.get("replies", [])):
        raise BackendError(f"{path}: expected a list of strings or {{'replies': [...], 'match': {{...}}}}")
    return ScriptedBackend(replies=list(data.get("replies", [])), match=data.get("match"),
                           name=f"scripted:{path.name}", **asdict(ScriptedOptions(**options)))
