"""A backend for OpenAI-compatible servers (vLLM, SGLang, ...): ``POST /v1/chat/completions``, streamed.

Standard library only (``http.client``). What it sends::

    {"model": ..., "messages": [...], "stream": true, "stream_options": {"include_usage": true},
     "max_tokens": N, "temperature": T, "stop": [...], "seed": S}

plus ``"logprobs": true, "top_logprobs": k`` when the request asks for ``k > 0`` alternatives per token
(read from each choice's ``logprobs.content[*].top_logprobs`` into ``Completion.top_logprobs``; a
server that sends none gives ``None``),

plus, when the last message is a partial assistant reply to continue (the solver's tool loop),
``"continue_final_message": true, "add_generation_prompt": false``: vLLM and SGLang accept these
chat-template options and render the partial reply without closing the turn. (OpenAI's own API
does not support continuing a message.)

Reading the stream (Server-Sent Events, ``data: {...}`` lines, ending with ``data: [DONE]``):

* ``delta.content`` is the answer text; ``delta.reasoning_content`` (vLLM/SGLang reasoning parsers)
  or ``delta.reasoning`` goes to ``Completion.reasoning``; so do ``<think>...</think>`` spans in the
  content, and, for R1-style templates that open ``<think>`` in the prompt, everything before a
  ``</think>`` that was never opened (that text may already have been streamed to ``on_text``; the
  returned Completion is right).
* Stop strings are also enforced client-side, so a server that ignores ``stop`` still stops there.
  Which stop string matched comes from vLLM's ``stop_reason`` or SGLang's ``matched_stop``; a
  server that reports neither gives ``finish_reason="eos"`` (the tool loop then still runs a code
  block that ends the text).
* Token counts come from the final ``usage`` chunk when the server sends one, else are estimated.

Failures raise BackendError with one line: ``cannot reach http://127.0.0.1:9/v1: connection
refused``, ``http://host/v1: no response within 60 s``, ``http://host/v1: HTTP 404: <message>``.
``timeout`` bounds the connection and each wait for the next streamed chunk.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from duet.agents.backends import (
    CONTEXT_FULL_HINTS,
    BackendError,
    Completion,
    ContextFullError,
    Message,
    Request,
    StreamCutter,
    TextCallback,
    is_continuation,
    option,
)

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


@dataclass(frozen=True)
class OpenAIOptions:
    """The OpenAI backend's options (``timeout``: seconds for the connection and each streamed chunk; duet's
    commands pass the ``server_timeout`` setting; ``extra_body``: fields added to each request)."""

    timeout: float = option("seconds", 60.0, setting="server_timeout", answers=False)
    api_key: str | None = option("text", None, answers=False)  # None: $DUET_API_KEY, else $OPENAI_API_KEY
    extra_body: dict[str, Any] | None = option("object", None)


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
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.model = model or None
        self.api_key = api_key or os.environ.get("DUET_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.extra_body = dict(extra_body or {})
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BackendError(f"not an http(s) URL: {base_url!r}")
        self._parts = parts

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
        """Stream a chat completion (see the module docstring for the request and the reading rules)."""
        started = time.perf_counter()
        body: dict[str, Any] = {
            "model": self.model or self.resolve_model(),
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        if request.logprobs > 0:
            body["logprobs"] = True
            body["top_logprobs"] = request.logprobs
        if is_continuation(messages):
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        body.update(self.extra_body)
        conn, response = self._request("POST", "/chat/completions", body)
        try:
            completion = self._read_stream(response, request.stop, on_text, cancel)
        finally:
            conn.close()
        if not completion.prompt_tokens:
            completion.prompt_tokens = sum(len(m["content"]) for m in messages) // 4
        completion.seconds = time.perf_counter() - started
        return completion

    def resolve_model(self) -> str:
        """Ask ``GET /v1/models`` for the served model (vLLM and SGLang serve one) and remember it."""
        conn, response = self._request("GET", "/models", None)
        try:
            data = json.loads(self._read_all(response))
            self.model = str(data["data"][0]["id"])
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise BackendError(f"{self.base_url}/models: no model listed; name the model with --model-name "
                               f"(or <url>#<model> in a backend spec)") from error
        finally:
            conn.close()
        return self.model

    # -- HTTP ----------------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        parts = self._parts
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname, parts.port, timeout=self.timeout)
        headers = {"Accept": "text/event-stream" if body and body.get("stream") else "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            conn.request(method, parts.path + path, body=payload, headers=headers)
            response = conn.getresponse()
        except Exception as error:
            conn.close()
            raise self._network_error(error) from error
        if response.status != 200:
            detail = _error_message(self._read_all(response, limit=4000)) or response.reason
            conn.close()
            full = response.status == 400 and any(h in detail.lower() for h in CONTEXT_FULL_HINTS)
            raise (ContextFullError if full else BackendError)(f"{self.base_url}: HTTP {response.status}: {detail}")
        return conn, response

    def _network_error(self, error: BaseException) -> BackendError:
        if isinstance(error, BackendError):
            return error
        if isinstance(error, ConnectionRefusedError):
            return BackendError(f"cannot reach {self.base_url}: connection refused")
        if isinstance(error, (socket.timeout, TimeoutError)):
            return BackendError(f"{self.base_url}: no response within {self.timeout:g} s")
        if isinstance(error, socket.gaierror):
            return BackendError(f"cannot reach {self.base_url}: unknown host {self._parts.hostname}")
        if isinstance(error, http.client.HTTPException):
            return BackendError(f"{self.base_url}: bad HTTP response ({type(error).__name__}: {error})")
        if isinstance(error, OSError):
            return BackendError(f"cannot reach {self.base_url}: {error.strerror or error}")
        return BackendError(f"{self.base_url}: {type(error).__name__}: {error}")

    def _read_all(self, response: http.client.HTTPResponse, limit: int = 1 << 20) -> str:
        try:
            return response.read(limit).decode("utf-8", "replace")
        except Exception as error:
            raise self._network_error(error) from error

    # -- streaming -----------------------------------------------------------------------------

    def _read_stream(
        self,
        response: http.client.HTTPResponse,
        stop: Sequence[str],
        on_text: TextCallback | None,
        cancel: threading.Event | None,
    ) -> Completion:
        state = _StreamState(stop, on_text)
        if "json" in (response.getheader("Content-Type") or "") and "event-stream" not in (
            response.getheader("Content-Type") or ""
        ):  # the server ignored "stream": one JSON body
            state.chunk(_json(self._read_all(response), self.base_url), self.base_url)
            return state.completion(done=True)
        done = False
        while not done:
            if cancel is not None and cancel.is_set():
                state.cancelled = True
                break
            try:
                raw = response.readline()
            except Exception as error:
                raise self._network_error(error) from error
            if not raw:
                break
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue  # blank separators, ": keep-alive" comments, "event:" lines
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
            elif state.chunk(_json(data, self.base_url), self.base_url):
                done = True  # a stop string matched client-side: stop reading
        return state.completion(done=done)


class _StreamState:
    """Accumulates one streamed completion."""

    def __init__(self, stop: Sequence[str], on_text: TextCallback | None) -> None:
        self.stops = list(stop)
        self.cutter = StreamCutter(stop, on_text)
        self.think = ThinkSplitter()
        self.reasoning = ""
        self.finish: str | None = None
        self.matched: Any = None
        self.usage: dict[str, Any] = {}
        self.pieces = 0
        self.cancelled = False
        self.top_logprobs: list[dict[str, float]] = []

    def chunk(self, obj: Any, where: str) -> bool:
        """Take one parsed chunk; True when a stop string matched (reading should end)."""
        if not isinstance(obj, dict):
            raise BackendError(f"{where}: unexpected stream chunk {str(obj)[:80]!r}")
        if obj.get("error"):
            raise BackendError(f"{where}: {_error_message(obj) or 'server error'}")
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or choice.get("message") or {}
            thought = delta.get("reasoning_content") or delta.get("reasoning")
            if thought:
                self.reasoning += thought
                self.pieces += 1
            self._logprobs(choice.get("logprobs"))
            content = delta.get("content")
            if content:
                self.pieces += 1
                if self._content(self.think.feed(content)):
                    return True
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
                self.matched = choice.get("stop_reason", choice.get("matched_stop"))
        return False

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

    def completion(self, *, done: bool) -> Completion:
        if self.cutter.stop_string is None:
            self._content(self.think.flush())
        text = self.cutter.finish()
        if self.cutter.stop_string is not None:
            finish, stop_string = "stop", self.cutter.stop_string
        elif self.cancelled:
            finish, stop_string = "cancelled", None
        elif self.finish == "length":
            finish, stop_string = "length", None
        elif self.finish is None and not done:
            raise BackendError("the server closed the stream before finishing")
        elif isinstance(self.matched, str) and self.matched in self.stops:
            finish, stop_string = "stop", self.matched
        else:
            finish, stop_string = "eos", None
        return Completion(
            text=text,
            reasoning=self.reasoning,
            finish_reason=finish,
            stop_string=stop_string,
            prompt_tokens=int(self.usage.get("prompt_tokens") or 0),
            completion_tokens=int(self.usage.get("completion_tokens") or self.pieces),
            top_logprobs=self.top_logprobs or None,
        )


def _json(data: str, where: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as error:
        raise BackendError(f"{where}: unreadable reply {data[:80]!r}") from error


def _error_message(body: Any) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message": ...}}``), else the text."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return body.strip()[:200]
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)[:200]
        return str(error)[:200]
    return str(body)[:200]


def from_spec(argument: str, **options: Any) -> OpenAIBackend:
    """``openai:<base_url>[#<model>]``, e.g. ``openai:http://127.0.0.1:8000/v1#deepseek-ai/DeepSeek-R1``."""
    url, _, model = argument.partition("#")
    if not url:
        raise BackendError("openai backend needs a URL: openai:http://host:8000/v1#<model>")
    return OpenAIBackend(url, model or None, **asdict(OpenAIOptions(**options)))
