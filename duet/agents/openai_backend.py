"""A backend for OpenAI-compatible servers (vLLM, SGLang, llama.cpp, ``transformers serve``, ...), streamed.

What it sends to ``POST /v1/chat/completions``::

    {"model": ..., "messages": [...], "stream": true, "stream_options": {"include_usage": true},
     "max_tokens": N, "temperature": T, "stop": [...], "seed": S}

plus ``"logprobs": true, "top_logprobs": k`` when the request asks for ``k > 0`` alternatives per token
(read from each choice's ``logprobs.content[*].top_logprobs`` into ``Completion.top_logprobs``; a
server that sends none gives ``None``).

Continuing a partial assistant reply (the solver's tool loop), and only then: vLLM and SGLang take
``"continue_final_message": true, "add_generation_prompt": false`` and render the partial reply without
closing the turn; llama.cpp's ``llama-server`` continues a final assistant message by itself (and repeats
it at the start of its reply: the probe sees it, and duet drops the repeat). Others do
not: ``transformers serve`` answers HTTP 422, llama-cpp-python ignores the fields and starts a new reply.
So the first continuation on a server (once per process, per server and model) asks it for one token
twice, not streamed (its usage is then always sent): a new turn, and the same conversation with a
one-letter partial reply and the fields. An error status means it cannot continue; so does a prompt more
than one token longer than the new turn's (the letter's one token, plus an end of turn and a new
header: the turn was closed and another opened). duet then renders the chat template itself
(:mod:`duet.agents.chat_template`: the ``tokenizer`` option, else the model's name or ``root`` in
``/v1/models`` where they are on this machine) and continues through ``POST /v1/completions`` with that
prompt; with no template anywhere, one line says what to pass. A server that reports no token counts is
taken at its word.

Reading the stream (Server-Sent Events, ``data: {...}`` lines, ending with ``data: [DONE]``):

* ``delta.content`` (``text`` from ``/completions``) is the answer text; ``delta.reasoning_content``
  (vLLM/SGLang reasoning parsers) or ``delta.reasoning`` goes to ``Completion.reasoning``; so do
  ``<think>...</think>`` spans in the content, and, for R1-style templates that open ``<think>`` in the
  prompt, everything before a ``</think>`` that was never opened (that text may already have been
  streamed to ``on_text``; the returned Completion is right).
* Stop strings and ``max_tokens`` are also enforced client-side (a streamed piece counts as a token), so a
  server that ignores them still stops there.
* Which stop string matched comes from vLLM's ``stop_reason``, SGLang's ``matched_stop`` or llama.cpp's
  ``stopping_word`` (in ``__verbose``, sent when ``llama-server`` runs with ``-v``). A ``stop`` finish from a
  server that has none of them (llama.cpp's OpenAI endpoints otherwise, which also strip the stop string) may be a
  stop string or the end of the turn, unless the server was seen to send a stop string in its text
  (``transformers serve`` does not strip them): then it is the end of the turn. Otherwise duet asks the server
  for the next few tokens without stop strings: the stop string is in that output or it is not
  (:meth:`OpenAIBackend._resolve_stop`).
* A stream that ends without a ``finish_reason`` (``[DONE]`` or not) is a truncated reply: an error.
* Token counts come from the final ``usage`` chunk when the server sends one, else are estimated.

HTTP, retries, time limits and the one-line errors are in :mod:`duet.agents.openai_http`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from duet.agents.backends import (
    BackendError,
    Completion,
    ContextFullError,
    Message,
    Request,
    StreamCutter,
    TextCallback,
    is_context_full,
    is_continuation,
    option,
)
from duet.agents.chat_template import ChatTemplate, load_tokenizer, template_sources
from duet.agents.openai_http import (
    Deadline,
    Http,
    HttpStatusError,
    Limits,
    html_summary,
    is_html,
    message_of,
    read_text,
)
from duet.terminal import safe_text

if TYPE_CHECKING:
    import httpx

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def normalize_base_url(url: str) -> str:
    """``host:8000`` / ``http://host:8000`` / ``http://host:8000/v1/`` -> ``http://host:8000/v1``.

    Only a bare host gets ``/v1`` (vLLM's and SGLang's path); a URL with a path is used as given, for
    servers whose OpenAI API lives elsewhere (``.../v1beta/openai``, a proxy's prefix)."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url if urlsplit(url).path else url + "/v1"


class ThinkSplitter:
    """Splits streamed content into answer text and ``<think>`` reasoning, across chunk boundaries.

    ``feed(piece)`` returns a list of ``(kind, text)`` with kind "text", "reasoning", or "stray_close"
    (a ``</think>`` never opened: the text so far was reasoning).
    """

    def __init__(self) -> None:
        self.inside = False
        self.opened = False
        self.buf = ""

    def feed(self, piece: str) -> list[tuple[str, str]]:
        """Classify ``piece``; a possible partial tag at its end is held until the next call."""
        self.buf += piece
        out: list[tuple[str, str]] = []
        while self.buf:
            tags = [THINK_CLOSE] if self.inside else [THINK_OPEN, THINK_CLOSE]
            hits = [(self.buf.find(t), t) for t in tags if t in self.buf]
            if hits:
                index, tag = min(hits)
                self._out(out, self.buf[:index])
                self.buf = self.buf[index + len(tag) :]
                if tag == THINK_OPEN:
                    self.inside = self.opened = True
                elif self.inside:
                    self.inside = False
                elif not self.opened:
                    out.append(("stray_close", ""))
                    self.opened = True
                continue
            keep = max((k for t in tags for k in range(1, len(t)) if self.buf.endswith(t[:k])), default=0)
            self._out(out, self.buf[: len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep :]
            break
        return out

    def flush(self) -> list[tuple[str, str]]:
        """What is still held back (a partial tag that never completed)."""
        out: list[tuple[str, str]] = []
        self._out(out, self.buf)
        self.buf = ""
        return out

    def _out(self, out: list[tuple[str, str]], text: str) -> None:
        if text:
            out.append(("reasoning" if self.inside else "text", text))


class EchoStripper:
    """Drops the partial reply that a server repeats at the start of its continuation (llama.cpp's llama-server);
    text that turns out not to repeat it passes unchanged. ``feed`` returns what follows the echo."""

    def __init__(self, echo: str) -> None:
        self.echo = echo
        self.held = ""
        self.settled = not echo

    def feed(self, piece: str) -> str:
        if self.settled:
            return piece
        self.held += piece
        if self.held.startswith(self.echo):
            self.settled = True
            return self.held[len(self.echo) :]
        if self.echo.startswith(self.held):
            return ""  # so far the echo: hold it
        self.settled = True
        return self.held

    def flush(self) -> str:
        """What is still held (the stream ended inside what looked like the echo)."""
        held, self.held, self.settled = ("" if self.settled else self.held), "", True
        return held


@dataclass(frozen=True)
class OpenAIOptions:
    """The OpenAI backend's options (``timeout``: seconds for the connection and each wait for data, duet's
    commands pass the ``server_timeout`` setting; ``deadline``: seconds for a whole request, streaming
    included; ``retries``/``retry_seconds``: tries after a 429, 502, 503 or a reset connection, and the waiting
    they may take in all; ``extra_body``: fields added to each request; ``tokenizer``: the served model's
    tokenizer or checkpoint directory, for servers that cannot continue a message)."""

    timeout: float = option("seconds", 60.0, setting="server_timeout", answers=False)
    deadline: float = option("seconds", 900.0, answers=False)
    retries: int = option("count or 0", 4, answers=False)
    retry_seconds: float = option("seconds or 0", 60.0, answers=False)
    api_key: str | None = option("text", None, answers=False)  # None: $DUET_API_KEY, else $OPENAI_API_KEY
    extra_body: dict[str, Any] | None = option("object", None)
    tokenizer: str | None = option("text", None)  # None: $DUET_TOKENIZER, else the model name if it is a directory


CONTINUE_FIELDS = {"continue_final_message": True, "add_generation_prompt": False}
"""vLLM's and SGLang's chat-template options that keep the last (assistant) message open."""
STOP_PEEK_TOKENS = 16
"""Tokens asked for after a reply that ended on an unnamed stop, to see whether a stop string comes next."""
STOP_FIELDS = ("stop_reason", "matched_stop", "stopping_word")
"""The fields that name the stop string that matched: a finishing choice's (vLLM, SGLang), llama.cpp's own."""

@dataclass(frozen=True)
class Continuation:
    """What the probe learnt of a server: whether it continues a final assistant message (``why_not`` if not), and
    whether its reply repeats that message before the continuation (llama.cpp's ``llama-server`` does)."""

    works: bool
    why_not: str = ""
    echoes: bool = False


_CONTINUES: dict[tuple[str, str], Continuation] = {}
"""(API root, model) -> what the server does with a final assistant message; probed once a process."""
_PROBE_LOCK = threading.Lock()
_SENDS_STOPS: set[tuple[str, str]] = set()
"""(API root, model) of servers seen to send a stop string in the text (``transformers serve``): they do not strip
them, so their ``stop`` finishes that do not say which stop matched are ends of turn."""


def forget_servers() -> None:
    """Forget what the probes learnt about servers (for tests that reuse a port)."""
    with _PROBE_LOCK:
        _CONTINUES.clear()
        _SENDS_STOPS.clear()


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible server. ``model=None``: the server's first model."""

    concurrent = True  # the server takes requests in parallel
    model_backed = True  # a model answers (not a script): the critic's verifier is on by default

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        deadline: float = 900.0,
        retries: int = 4,
        retry_seconds: float = 60.0,
        extra_body: dict[str, Any] | None = None,
        tokenizer: str | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.model = model or None
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BackendError(f"not an http(s) URL: {base_url!r}")
        key = api_key or os.environ.get("DUET_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.limits = Limits(timeout=timeout, deadline=deadline, retries=retries, retry_seconds=retry_seconds)
        self.http = Http(self.base_url, key, self.limits)
        self.extra_body = dict(extra_body or {})
        self.tokenizer = tokenizer
        self._template: ChatTemplate | None = None
        self._template_lock = threading.Lock()  # many dialogues may need it first at once (duet eval -j 16)

    @property
    def name(self) -> str:
        """The model name (or the server URL until the model is known)."""
        return self.model or self.base_url

    def complete(
        self,
        messages: Sequence[Message],
        request: Request = Request(),
        *,
        on_text: TextCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> Completion:
        """Stream a completion (see the module docstring for the request and the reading rules)."""
        started = time.perf_counter()
        deadline = Deadline(self.limits.deadline)
        model = self.model or self.resolve_model()
        body: dict[str, Any] = {"model": model}
        continuation = self.continuation(model, deadline) if is_continuation(messages) else None
        echo = ""  # what the server will repeat before its continuation
        if continuation is not None and not continuation.works:
            path = "/completions"
            try:
                body["prompt"] = self.chat_template(model).continuation(messages)
            except BackendError as error:  # the tokenizer's or template's failure: say for which server
                text = str(error)
                raise BackendError(text if self.base_url in text else f"{self.base_url}: {text}") from error
        else:
            path = "/chat/completions"
            body["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
            if continuation is not None:
                body.update(CONTINUE_FIELDS)
                echo = messages[-1]["content"] if continuation.echoes else ""
            if request.logprobs > 0:
                body["logprobs"] = True
                body["top_logprobs"] = request.logprobs
        completion = self._stream(path, {**body, **self._sampling(request)}, request, on_text, cancel, deadline, echo)
        if completion.stop_unknown and (self.base_url, model) in _SENDS_STOPS:
            completion.stop_unknown = False
        if completion.stop_unknown:
            self._resolve_stop(messages, request, completion)
        if not completion.prompt_tokens:
            completion.prompt_tokens = sum(len(m["content"]) for m in messages) // 4
        completion.seconds = time.perf_counter() - started
        return completion

    def _resolve_stop(self, messages: Sequence[Message], request: Request, completion: Completion) -> None:
        """A ``stop`` finish that did not say whether a stop string matched (llama.cpp strips it and names none):
        ask again from where the reply ended, without stop strings, for a few tokens. The stop string at their
        start is what ended the reply; nothing (the model's end of turn at once) or other text is the end of the
        turn. Greedy replies are resolved exactly; sampled ones as the follow-up samples."""
        history = list(messages[:-1]) if is_continuation(messages) else list(messages)
        partial = messages[-1]["content"] if is_continuation(messages) else ""
        peek = Request(max_tokens=STOP_PEEK_TOKENS, temperature=request.temperature, seed=request.seed)
        after = self.complete([*history, {"role": "assistant", "content": partial + completion.text}], peek)
        matched = next((stop for stop in request.stop if after.text.startswith(stop)), None)
        completion.stop_unknown = False
        if matched is not None:
            completion.finish_reason, completion.stop_string = "stop", matched

    def _sampling(self, request: Request) -> dict[str, Any]:
        body: dict[str, Any] = {
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        return {**body, **self.extra_body}

    def resolve_model(self) -> str:
        """Ask ``GET /v1/models`` for the served model (vLLM and SGLang serve one) and remember it."""
        listed = self.models(self.limits.deadline)
        if not listed or "id" not in listed[0]:
            raise BackendError(f"{self.http.url('/models')}: no model listed; name the model with --model-name "
                               f"(or <url>#<model> in a backend spec)")
        self.model = str(listed[0]["id"])
        return self.model

    def models(self, seconds: float) -> list[dict[str, Any]]:
        """The entries of ``GET /v1/models`` (none for a reply that lists none)."""
        with self.http.open("GET", "/models", None, Deadline(seconds)) as response:
            text = read_text(response, 1 << 20)
        try:
            listed = json.loads(text).get("data")
        except (ValueError, AttributeError):
            return []
        return [m for m in listed if isinstance(m, dict)] if isinstance(listed, list) else []

    # -- continuing an assistant message -------------------------------------------------------

    def continuation(self, model: str, deadline: Deadline) -> Continuation:
        """What the server does with a partial assistant message (probed once per process and server)."""
        key = (self.base_url, model)
        with _PROBE_LOCK:
            if key not in _CONTINUES:
                _CONTINUES[key] = self._probe(model, deadline)
        return _CONTINUES[key]

    def _probe(self, model: str, deadline: Deadline) -> Continuation:
        """Ask for one token after a new turn and after a one-letter partial reply (see the module docstring)."""
        one = Request(max_tokens=1)
        body = {"model": model, **self._sampling(one), "stream": False}
        del body["stream_options"]  # not streamed: servers send usage with a whole reply, not all in streams
        user = [{"role": "user", "content": "Say hello."}]
        partial = {**body, "messages": [*user, {"role": "assistant", "content": "A"}], **CONTINUE_FIELDS}
        try:
            kept = self._stream("/chat/completions", partial, one, None, None, deadline)
        except HttpStatusError as error:
            if 400 <= error.status < 500 and not isinstance(error, ContextFullError):
                return Continuation(False, f"HTTP {error.status} to continue_final_message")
            raise
        fresh = self._stream("/chat/completions", {**body, "messages": user}, one, None, None, deadline)
        if kept.prompt_tokens and fresh.prompt_tokens and kept.prompt_tokens - fresh.prompt_tokens > 1:
            return Continuation(False, "it ignores continue_final_message and starts a new reply")
        # one token asked for: a reply that starts with the partial "A" repeats it (llama.cpp: "A dozen")
        return Continuation(True, echoes=kept.text.startswith("A"))

    def chat_template(self, model: str) -> ChatTemplate:
        """The template to render continuations with; a one-line error naming what to pass when there is none."""
        with self._template_lock:
            if self._template is None:
                sources = template_sources(self.tokenizer, [model, *self._served_paths(model)])
                tokenizer = load_tokenizer(sources)
                if tokenizer is None:
                    why = _CONTINUES.get((self.base_url, model), Continuation(False, "it cannot")).why_not
                    # the advice before the model's name: a long path is what one_line would cut
                    raise BackendError(
                        f"{self.base_url} cannot continue an assistant message ({why}); name the served model's "
                        f"tokenizer (-O tokenizer=DIR or Hub id, or DUET_TOKENIZER) so duet renders its chat template "
                        f"for /completions (none found for {model!r})")
                self._template = ChatTemplate(tokenizer, getattr(tokenizer, "name_or_path", model))
        return self._template

    def _served_paths(self, model: str) -> list[str]:
        """What ``/v1/models`` says ``model`` was loaded from (vLLM's and SGLang's ``root``); none on a failure."""
        try:
            listed = self.models(self.limits.timeout)
        except BackendError:
            return []
        return [m["root"] for m in listed if m.get("id") == model and isinstance(m.get("root"), str)]

    # -- streaming -----------------------------------------------------------------------------

    def _stream(
        self,
        path: str,
        body: dict[str, Any],
        request: Request,
        on_text: TextCallback | None,
        cancel: threading.Event | None,
        deadline: Deadline,
        echo: str = "",
    ) -> Completion:
        import httpx

        url = self.http.url(path)
        state = _StreamState(request.stop, request.max_tokens, on_text, echo)
        with self.http.open("POST", path, body, deadline) as response:
            try:
                for data in self._events(response, url, deadline):
                    if cancel is not None and cancel.is_set():
                        state.cancelled = True
                        break
                    if data == "[DONE]":
                        state.done = True
                        break
                    if state.chunk(_json(data, url), url):
                        break  # a stop string matched, or max_tokens: stop reading
            except httpx.TimeoutException as error:
                raise self.http.timeout_error(url, deadline) from error
            except httpx.HTTPError as error:
                raise self.http.network_error(error, url) from error
        if state.cutter.stop_string is not None:
            _SENDS_STOPS.add((self.base_url, str(body.get("model"))))
        return state.completion(url)

    def _events(self, response: httpx.Response, url: str, deadline: Deadline) -> Iterator[str]:
        """The ``data:`` payloads of a reply; a whole JSON body (a server that does not stream) is one."""
        content_type = response.headers.get("Content-Type", "")
        if "event-stream" in content_type:
            lines: Iterator[str] = response.iter_lines()
        else:
            text = read_text(response, 1 << 22)
            if is_html(text, content_type):
                raise BackendError(f"{url}: not an OpenAI-compatible server (HTTP {response.status_code} with "
                                   f"{html_summary(text)})")
            if "json" in content_type or text.lstrip().startswith("{"):
                yield text
                return
            lines = iter(text.splitlines())
        last_data = time.monotonic()
        for line in lines:
            now = time.monotonic()
            if deadline.passed():
                raise self.http.timeout_error(url, deadline)
            if line.startswith("data:"):
                last_data = now
                yield line[5:].strip()
            elif now - last_data > self.limits.timeout:  # keep-alive comments are no progress
                raise BackendError(f"{url}: no data within {self.limits.timeout:g} s (only keep-alive comments)")


class _StreamState:
    """Accumulates one streamed completion."""

    def __init__(self, stop: Sequence[str], max_tokens: int, on_text: TextCallback | None, echo: str = "") -> None:
        self.stops = list(stop)
        self.echo = EchoStripper(echo)
        self.max_tokens = max_tokens
        self.cutter = StreamCutter(stop, on_text)
        self.think = ThinkSplitter()
        self.reasoning = ""
        self.finish: str | None = None
        self.matched: Any = None
        self.says_which_stop = False  # the finish chunk has a stop_reason/matched_stop field
        self.usage: dict[str, Any] = {}
        self.pieces = 0
        self.cancelled = False
        self.done = False
        self.top_logprobs: list[dict[str, float]] = []
        self.token_logprobs: list[float] = []  # each generated token's own log-probability, where given

    def chunk(self, obj: Any, where: str) -> bool:
        """Take one parsed chunk; True when reading should end (a stop string matched, max_tokens reached)."""
        if not isinstance(obj, dict):
            raise BackendError(f"{where}: unexpected stream chunk {safe_text(str(obj)[:80])!r}")
        if obj.get("error"):
            message = safe_text(message_of(obj))[:200] or "server error"
            raise (ContextFullError if is_context_full(message) else BackendError)(f"{where}: {message}")
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or choice.get("message") or {}
            thought = delta.get("reasoning_content") or delta.get("reasoning")
            content = delta.get("content") if "text" not in choice else choice.get("text")
            content = self.echo.feed(content) if content else content
            if (thought or content) and self.pieces >= self.max_tokens:
                self.finish = "length"  # the server ignores max_tokens: cut it here
                return True
            if thought:
                self.reasoning += thought
                self.pieces += 1
            self._logprobs(choice.get("logprobs"))
            if content:
                self.pieces += 1
                if self._content(self.think.feed(content)):
                    return True
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
                self._stop_named(choice)
        if isinstance(obj.get("__verbose"), dict):  # llama-server -v: its own fields, stopping_word among them
            self._stop_named(obj["__verbose"])
        return False

    def _stop_named(self, fields: dict[str, Any]) -> None:
        """Note which stop string matched where ``fields`` say (an empty or null one: none did, the turn ended)."""
        named = [fields[k] for k in STOP_FIELDS if k in fields]
        if named:
            self.says_which_stop = True
            self.matched = next((m for m in named if m), self.matched)

    def _logprobs(self, logprobs: Any) -> None:
        """``{"content": [{"token", "logprob", "top_logprobs": [{"token", "logprob"}, ...]}, ...]}``: one
        dict of alternatives per token (the token itself added when the server left it out)."""
        entries = logprobs.get("content") if isinstance(logprobs, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            top = {str(alt["token"]): float(alt["logprob"]) for alt in entry.get("top_logprobs") or []
                   if isinstance(alt, dict) and "token" in alt and alt.get("logprob") is not None}
            if "token" in entry and entry.get("logprob") is not None:
                top.setdefault(str(entry["token"]), float(entry["logprob"]))
                self.token_logprobs.append(float(entry["logprob"]))
            self.top_logprobs.append(top)

    def _content(self, parts: list[tuple[str, str]]) -> bool:
        for kind, text in parts:
            if kind == "reasoning":
                self.reasoning += text
            elif kind == "stray_close":
                self.reasoning += self.cutter.text
                self.cutter.reset()
            elif self.cutter.feed(text):
                return True
        return False

    def completion(self, where: str) -> Completion:
        if self.cutter.stop_string is None:
            self._content(self.think.feed(self.echo.flush()) + self.think.flush())
        text = self.cutter.finish()
        unknown = False
        if self.cutter.stop_string is not None:
            finish, stop_string = "stop", self.cutter.stop_string
        elif self.cancelled:
            finish, stop_string = "cancelled", None
        elif self.finish == "length":
            finish, stop_string = "length", None
        elif self.finish is None:
            how = "with [DONE] and no finish_reason" if self.done else "before finishing"
            raise BackendError(f"{where}: the server ended the stream {how}: the reply is truncated")
        elif isinstance(self.matched, str) and self.matched in self.stops:
            finish, stop_string = "stop", self.matched
        else:
            finish, stop_string = "eos", None
            unknown = self.finish == "stop" and bool(self.stops) and not self.says_which_stop
        return Completion(
            text=text,
            reasoning=self.reasoning,
            finish_reason=finish,
            stop_string=stop_string,
            stop_unknown=unknown,
            prompt_tokens=int(self.usage.get("prompt_tokens") or 0),
            completion_tokens=int(self.usage.get("completion_tokens") or self.pieces),
            top_logprobs=self.top_logprobs or None,
            # every token's, or none: a partial list would give the verifier a wrong confidence
            token_logprobs=self.token_logprobs if self.token_logprobs and len(self.token_logprobs) == len(
                self.top_logprobs) else None,
        )


def _json(data: str, where: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as error:
        raise BackendError(f"{where}: unreadable reply {safe_text(data[:80])!r}") from error


def from_spec(argument: str, **options: Any) -> OpenAIBackend:
    """``openai:<base_url>[#<model>]``, e.g. ``openai:http://127.0.0.1:8000/v1#deepseek-ai/DeepSeek-R1``."""
    url, _, model = argument.partition("#")
    if not url:
        raise BackendError("openai backend needs a URL: openai:http://host:8000/v1#<model>")
    return OpenAIBackend(url, model or None, **asdict(OpenAIOptions(**options)))
