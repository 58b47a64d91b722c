"""HTTP for the OpenAI-compatible backend (httpx): one request, retried, bounded in time, failing in one line.

* Retries: HTTP 429, 502 and 503 and a connection reset before the reply began are tried again, up to
  ``retries`` times and ``retry_seconds`` of waiting in all, after the server's ``Retry-After`` when it
  sends one, else after an exponential backoff with full jitter (0.5 s, 1 s, 2 s, ... capped at 20 s).
* Time: ``timeout`` bounds the connection and each wait for data; :class:`Deadline` bounds a whole
  request (streaming included), so a server that sends only keep-alive comments cannot hold it forever.
* Errors: :class:`BackendError` (``ContextFullError`` for a prompt longer than the server's context), one
  line naming the URL; an HTML page is summarised by its status and ``<title>``; server text is made safe
  for a terminal (:func:`duet.terminal.safe_text`).

httpx is imported on first use: ``duet --help`` imports this module (for the backends' option help) and
should not pay for it.
"""

from __future__ import annotations

import email.utils
import html
import json
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from duet.agents.backends import BackendError, ContextFullError, is_context_full, one_line
from duet.terminal import safe_text

if TYPE_CHECKING:
    import httpx

RETRY_STATUS = (429, 502, 503)
BACKOFF_FIRST, BACKOFF_CAP = 0.5, 20.0


class HttpStatusError(BackendError):
    """The server answered with an error status (``status``)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Deadline:
    """The time left for one request: ``seconds`` from now, whatever the server sends meanwhile."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


@dataclass(frozen=True)
class Limits:
    """How long to wait and how often to try (the backend's options of the same names)."""

    timeout: float = 60.0
    deadline: float = 900.0
    retries: int = 4
    retry_seconds: float = 60.0


class Http:
    """Requests to one OpenAI-compatible API root (``http://host:8000/v1``); safe to share between threads."""

    def __init__(self, base_url: str, api_key: str | None, limits: Limits) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.limits = limits
        self._client: httpx.Client | None = None

    def client(self) -> httpx.Client:
        if self._client is None:
            import httpx

            # many threads stream at once (duet eval -j 16): let each have its own connection
            pool = httpx.Limits(max_connections=64, max_keepalive_connections=16)
            self._client = httpx.Client(timeout=self.limits.timeout, limits=pool, trust_env=False)
        return self._client

    def url(self, path: str) -> str:
        return self.base_url + path

    @contextmanager
    def open(self, method: str, path: str, body: dict[str, Any] | None, deadline: Deadline) -> Iterator[httpx.Response]:
        """The response to ``method path`` with status 200, its body not yet read (closed on exit)."""
        import httpx

        url, tries, waited = self.url(path), 0, 0.0
        while True:
            tries += 1
            wait: float | None = None
            try:
                response = self._send(method, url, body, deadline)
            except httpx.TimeoutException as error:
                raise self.timeout_error(url, deadline) from error
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as error:
                wait = self._backoff(tries, None)  # the connection was reset: worth another try
                failure = self.network_error(error, url)
            except httpx.HTTPError as error:
                raise self.network_error(error, url) from error
            else:
                if response.status_code == 200:
                    try:
                        yield response
                    finally:
                        response.close()
                    return
                try:
                    failure = self.status_error(response, url)
                finally:
                    response.close()
                if response.status_code in RETRY_STATUS:
                    wait = self._backoff(tries, response.headers.get("Retry-After"))
            budget = min(self.limits.retry_seconds - waited, deadline.left())
            if wait is None or tries > self.limits.retries or wait > budget:
                if tries > 1:
                    failure.args = (one_line(f"{failure} (gave up after {tries} tries, {waited:.1f} s of waiting)"),)
                raise failure
            time.sleep(wait)
            waited += wait

    def _send(self, method: str, url: str, body: dict[str, Any] | None, deadline: Deadline) -> httpx.Response:
        import httpx

        stream = bool(body and body.get("stream"))
        headers = {"Accept": "text/event-stream" if stream else "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        # each read waits at most `timeout`, and never past the request's deadline
        timeout = httpx.Timeout(max(0.01, min(self.limits.timeout, deadline.left())))
        client = self.client()
        request = client.build_request(method, url, json=body, headers=headers, timeout=timeout)
        return client.send(request, stream=True)

    def timeout_error(self, url: str, deadline: Deadline) -> BackendError:
        """One line for a wait that ran out: the request's deadline, or ``timeout`` without data."""
        if deadline.left() <= 0.05:
            return BackendError(f"{url}: no complete reply within the {deadline.seconds:g} s deadline")
        return BackendError(f"{url}: no response within {self.limits.timeout:g} s")

    @staticmethod
    def _backoff(tries: int, retry_after: str | None) -> float:
        """Seconds before try ``tries + 1``: the server's ``Retry-After`` (seconds or a date) when given."""
        if retry_after:
            seconds = _retry_after_seconds(retry_after)
            if seconds is not None:
                return max(0.0, seconds)
        return random.uniform(0, min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (tries - 1)))

    def status_error(self, response: httpx.Response, url: str) -> BackendError:
        """One line for a reply with an error status (its body read here, at most 64 KiB)."""
        body = read_text(response, 1 << 16)
        detail = error_detail(body, response.headers.get("Content-Type", "")) or response.reason_phrase
        message = f"{url}: HTTP {response.status_code}: {detail}"
        return ContextFullError(message) if is_context_full(detail) else HttpStatusError(message, response.status_code)

    def network_error(self, error: BaseException, url: str) -> BackendError:
        """One line for a failure below HTTP (refused, unknown host, reset, bad protocol)."""
        import httpx

        text = str(error) or type(error).__name__
        lowered = text.lower()
        if isinstance(error, httpx.ConnectError):
            if "refused" in lowered:
                return BackendError(f"cannot reach {self.base_url}: connection refused")
            if "name or service" in lowered or "nodename" in lowered or "getaddrinfo" in lowered:
                return BackendError(f"cannot reach {self.base_url}: unknown host")
            return BackendError(f"cannot reach {self.base_url}: {safe_text(text)}")
        if isinstance(error, (httpx.ReadError, httpx.WriteError)):
            return BackendError(f"{url}: the connection was reset ({safe_text(text)})")
        if isinstance(error, httpx.RemoteProtocolError):
            return BackendError(f"{url}: the server closed the connection ({safe_text(text)})")
        return BackendError(f"{url}: {type(error).__name__}: {safe_text(text)}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def read_text(response: httpx.Response, limit: int) -> str:
    """Up to ``limit`` bytes of a response's body as text (what a failing connection gave so far)."""
    import httpx

    data = b""
    try:
        for piece in response.iter_bytes():
            data += piece
            if len(data) >= limit:
                break
    except httpx.HTTPError:
        pass
    return data[:limit].decode("utf-8", "replace")


def _retry_after_seconds(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - time.time()


_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def is_html(body: str, content_type: str) -> bool:
    """A web page (a proxy's error page, a web UI), not an API reply."""
    head = body.lstrip()[:200].lower()
    return "text/html" in content_type.lower() or head.startswith(("<!doctype html", "<html"))


def html_summary(body: str) -> str:
    """``an HTML page titled '502 Bad Gateway'`` (or untitled)."""
    found = _TITLE.search(body)
    title = " ".join(html.unescape(found.group(1)).split())[:120] if found else ""
    return f"an HTML page titled {safe_text(title)!r}" if title else "an HTML page"


def error_detail(body: str, content_type: str = "") -> str:
    """The message of an error body: OpenAI's ``{"error": {"message": ...}}``, FastAPI's ``{"detail": ...}``,
    an HTML page's title, else the text (at most 200 characters, safe for a terminal)."""
    if is_html(body, content_type):
        return html_summary(body)
    try:
        data: Any = json.loads(body)
    except ValueError:
        return safe_text(body.strip()[:200])
    return safe_text(message_of(data)[:200])


def message_of(data: Any) -> str:
    """The message of a parsed error object (``{"error": {"message": ...}}``, ``{"message": ...}``, ...)."""
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)
        return str(error)
    return str(data)
