"""The HTTP API: OpenAI's chat and text completions (plus vLLM's extensions), models, health and metrics.

``POST /v1/chat/completions`` takes ``messages``, ``max_tokens`` (or ``max_completion_tokens``), ``temperature``
(default 1, as OpenAI's), ``top_p``, ``top_k`` (vLLM), ``seed``, ``stop`` (a string or a list), ``n``,
``logprobs``/``top_logprobs``, ``ignore_eos`` (vLLM), ``stream`` (Server-Sent Events,
``stream_options.include_usage``), and vLLM's chat-template options ``add_generation_prompt`` /
``continue_final_message``. Each choice has vLLM's ``stop_reason``: the stop string that ended it (None
otherwise). Unsupported options (penalties, logit_bias, tools, JSON mode) are refused with a 400, not ignored.

The models are the checkpoint (its id: the checkpoint directory's name, ``embedded`` for the embedded model),
``duet`` (the solver-critic dialogue on the last user message: the answer and a short explanation in the
message, the transcript in ``duet_transcript``; streamed, the dialogue's text arrives as ``reasoning_content``
as it is generated and every other event as ``duet_event``), and ``duet:solver-only`` (the solver alone).

With an API key every ``/v1`` route and ``/metrics`` need ``Authorization: Bearer KEY``; ``/health`` does not.
Errors are OpenAI's JSON on one line: ``{"error": {"message", "type", "param", "code"}}``. A client that
disconnects cancels its generations.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from duet.engine import SamplingParams
from duet.serve.request_shapes import (
    APIError,
    ChatBody,
    CompletionBody,
    RequestBody,
    chat_role,
    message_text,
    refuse_unsupported,
    usage_requested,
)
from duet.serve.response_shapes import (
    chat_logprobs,
    dialogue_summary,
    dialogue_usage,
    envelope,
    event_text,
    explain,
    finish_reason,
    new_id,
    text_logprobs,
)
from duet.serve.service import Busy, Service, TokenLogprob

DIALOGUE_MODELS = {"duet": False, "duet:solver-only": True}  # model id -> solver only
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
POLL_SECONDS = 0.2  # how often a non-streaming request checks whether its client is still there


class _Stream(StreamingResponse):
    """Server-Sent Events; `on_close` runs however the response ends (also when the client left before the body
    began, where the body's own `finally` never runs)."""

    def __init__(self, content: AsyncIterator[str], on_close: Any) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


# ------------------------------------------------------------------------------------------- the app


def create_app(service: Service, *, api_key: str | None = None) -> FastAPI:
    """The ASGI app over `service`; `api_key`: required as a bearer token on /v1 and /metrics."""
    app = FastAPI(title="duet serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    limits = service.limits

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, f"{error.detail}: {request.method} {request.url.path}", kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(error).__name__}: {error}", "server_error").response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "a valid API key is required: Authorization: Bearer KEY", "authentication_error",
                           code="invalid_api_key")

    async def read_body(request: Request, shape: type[BaseModel]) -> Any:
        authorize(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_request_bytes:
            raise APIError(413, f"the request has {declared} bytes; the limit is {limits.max_request_bytes}",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_request_bytes:
                raise APIError(413, f"the request is over the limit of {limits.max_request_bytes} bytes",
                               code="request_too_large")
        try:
            data = json.loads(body)
        except ValueError as error:
            raise APIError(400, f"the body is not JSON: {error}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            parsed = shape.model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise APIError(400, f"{where}: {first['msg']}", param=where) from None
        request.state.model = parsed.model or service.model_id
        return parsed

    @app.get("/health")
    async def health() -> dict[str, Any]:
        waiting, active = service.engine.occupancy()
        return {"status": "ok", "model": service.model_id, "in_flight": service.in_flight, "queue": waiting,
                "batch": active}

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        authorize(request)
        waiting, active = service.engine.occupancy()
        text = service.metrics.render(in_flight=service.in_flight, waiting=waiting, active=active,
                                      max_batch=service.engine.max_batch,
                                      prefix=service.engine.prefix_cache_stats())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        created = int(STARTED)
        ids = [service.model_id, *DIALOGUE_MODELS]
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": created, "owned_by": "duet",
             "max_model_len": service.engine.max_seq_len} for m in ids]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body: ChatBody = await read_body(request, ChatBody)
        model = body.model or service.model_id
        messages = [{"role": chat_role(m.role), "content": message_text(m.content, i)}
                    for i, m in enumerate(body.messages)]
        if model in DIALOGUE_MODELS:
            return await _dialogue(request, body, model, messages)
        _check_model(model)
        refuse_unsupported(body)
        if body.add_generation_prompt and body.continue_final_message:
            raise APIError(400, "add_generation_prompt and continue_final_message cannot both be true",
                           param="continue_final_message")
        if body.continue_final_message and messages[-1]["role"] != "assistant":
            raise APIError(400, "continue_final_message needs a final assistant message to continue",
                           param="continue_final_message")
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        try:
            prompt = service.chat_prompt(messages, add_generation_prompt=bool(body.add_generation_prompt),
                                         continue_final_message=bool(body.continue_final_message))
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from None
        except Exception as error:  # the chat template refused the messages (a role it does not know, ...)
            raise APIError(400, f"the chat template cannot render these messages: {error}",
                           param="messages") from None
        top = (body.top_logprobs or 0) if body.logprobs else None
        job = _Job(request, [prompt], _params(body, top), top)
        if body.stream:
            return job.stream("chat.completion.chunk", model, include_usage=usage_requested(body))
        results = await job.run()
        choices = []
        for i, (result, logprobs) in enumerate(results):
            choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": result.text},
                                      "logprobs": None if logprobs is None else {"content": chat_logprobs(logprobs)},
                                      "finish_reason": finish_reason(result), "stop_reason": result.stop_string}
            choices.append(choice)
        return JSONResponse(envelope("chatcmpl", "chat.completion", model, choices, job.usage(results)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionBody = await read_body(request, CompletionBody)
        model = body.model or service.model_id
        if model in DIALOGUE_MODELS:
            raise APIError(400, f"{model} is a chat model (the dialogue); use /v1/chat/completions", param="model")
        _check_model(model)
        refuse_unsupported(body)
        if body.echo or body.suffix:
            raise APIError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
        prompts = _prompts(body.prompt)
        job = _Job(request, prompts, _params(body, body.logprobs), body.logprobs)
        if body.stream:
            return job.stream("text_completion", model, include_usage=usage_requested(body))
        results = await job.run()
        choices = [{"index": i, "text": r.text, "finish_reason": finish_reason(r), "stop_reason": r.stop_string,
                    "logprobs": None if lp is None else text_logprobs(lp)} for i, (r, lp) in enumerate(results)]
        return JSONResponse(envelope("cmpl", "text_completion", model, choices, job.usage(results)))

    # ------------------------------------------------------------------------------- helpers over the service

    def _check_model(model: str) -> None:
        if model != service.model_id:
            raise APIError(404, f"the model {model!r} does not exist; this server has "
                                f"{', '.join([service.model_id, *DIALOGUE_MODELS])}",
                           "not_found_error", param="model", code="model_not_found")

    def _params(body: RequestBody, top: int | None = None) -> list[SamplingParams]:
        n = body.n or 1
        if n > limits.max_n:
            raise APIError(400, f"n={n} is over the limit of {limits.max_n}", param="n")
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if asked is not None and asked > limits.max_tokens:
            raise APIError(400, f"max_tokens={asked} is over this server's limit of {limits.max_tokens}",
                           param="max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 16 or any(not s for s in stop):
            raise APIError(400, "stop: at most 16 non-empty strings", param="stop")
        temperature = 1.0 if body.temperature is None else body.temperature
        try:
            return [SamplingParams(
                max_new_tokens=limits.default_max_tokens if asked is None else asked, temperature=temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=max(0, body.top_k or 0),
                seed=None if body.seed is None else body.seed + i, stop=stop, stop_at_eos=not body.ignore_eos,
                logprobs=top or 0)
                for i in range(n)]
        except ValueError as error:
            raise APIError(400, str(error)) from None

    def _prompts(prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, "the prompt is empty", param="prompt")
        vocab = len(service.engine.tokenizer)
        ids = []
        for item in items:
            tokens = service.engine.encode(item) if isinstance(item, str) else list(item)
            if any(not 0 <= t < vocab for t in tokens):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
            ids.append(tokens)
        return ids

    class _Job:
        """The generations of one request: every prompt x n choices, admitted together."""

        def __init__(self, request: Request, prompts: list[list[int]], params: list[SamplingParams],
                     top: int | None) -> None:
            for p in prompts:
                try:
                    service.check_prompt(p)
                except ValueError as error:
                    raise APIError(400, str(error), param="messages", code="context_length_exceeded") from None
            self.request, self.prompts, self.params, self.top = request, prompts, params, top
            self.cancel = threading.Event()
            try:
                self.ticket = service.reserve(len(prompts) * len(params))
            except Busy as error:
                raise APIError(429, str(error), "rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(limits.retry_after)}) from None

        async def _generate(self, on_text: Any = None) -> list[tuple[Any, list[TokenLogprob] | None]]:
            n = len(self.params)

            def shifted(offset: int) -> Any:
                return None if on_text is None else (lambda i, text: on_text(offset + i, text))

            batches = await asyncio.gather(*[
                service.generate(self.ticket, prompt, self.params, self.cancel, shifted(k * n))
                for k, prompt in enumerate(self.prompts)])
            out = []
            for results in batches:
                for r in results:
                    if r.finish_reason == "error":
                        raise APIError(500, f"generation failed: {r.error}", "server_error")
                    lp = None if self.top is None else service.logprobs(r, self.top)
                    out.append((r, lp))
            self.results = [r for r, _ in out]
            return out

        async def run(self) -> list[tuple[Any, list[TokenLogprob] | None]]:
            """Generate, cancelling when the client disconnects meanwhile."""
            task = asyncio.ensure_future(self._generate())
            try:
                while True:
                    done, _ = await asyncio.wait({task}, timeout=POLL_SECONDS)
                    if done:
                        return task.result()
                    if await self.request.is_disconnected():
                        self.cancel.set()
                        await asyncio.wait({task})
                        raise APIError(499, "the client closed the request", code="client_closed")
            finally:
                if not task.done():
                    self.cancel.set()
                    task.cancel()
                self.ticket.close()

        def usage(self, results: list[tuple[Any, Any]]) -> dict[str, Any]:
            prompt = sum(len(p) for p in self.prompts)
            completion = sum(r.completion_tokens for r, _ in results)
            cached = sum(r.cached_tokens for r, _ in results[:: len(self.params)])
            return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                    "prompt_tokens_details": {"cached_tokens": cached}}

        def stream(self, kind: str, model: str, *, include_usage: bool) -> StreamingResponse:
            chat = kind == "chat.completion.chunk"
            rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
            count = len(self.prompts) * len(self.params)

            def chunk(choices: list[dict], **extra: Any) -> str:
                data = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, **extra}
                return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

            def delta(i: int, text: str, **extra: Any) -> dict:
                body = {"content": text} if chat else {"text": text}
                return ({"index": i, "delta": body, "logprobs": None, "finish_reason": None, **extra} if chat
                        else {"index": i, **body, "logprobs": None, "finish_reason": None, **extra})

            async def events() -> AsyncIterator[str]:
                queue: asyncio.Queue = asyncio.Queue()
                task = asyncio.ensure_future(self._generate(lambda i, text: queue.put_nowait((i, text))))
                task.add_done_callback(lambda _: queue.put_nowait(None))
                try:
                    if chat:
                        for i in range(count):
                            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}])
                    while (item := await queue.get()) is not None:
                        # whatever else arrived meanwhile goes out in the same event (one per choice)
                        pieces: dict[int, str] = {item[0]: item[1]}
                        more = item
                        while not queue.empty() and (more := queue.get_nowait()) is not None:
                            pieces[more[0]] = pieces.get(more[0], "") + more[1]
                        yield chunk([delta(i, text) for i, text in pieces.items()])
                        if more is None:
                            break
                    try:
                        results = task.result()
                    except Exception as error:  # after the 200 went out: the error as one more event
                        failure = error if isinstance(error, APIError) else APIError(
                            500, f"generation failed: {type(error).__name__}: {error}", "server_error")
                        yield f"data: {json.dumps(failure.body())}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    for i, (r, lp) in enumerate(results):
                        if lp is not None:
                            logprobs = {"content": chat_logprobs(lp)} if chat else text_logprobs(lp)
                            yield chunk([{**delta(i, ""), "logprobs": logprobs}])
                        yield chunk([{**delta(i, ""), "finish_reason": finish_reason(r), "stop_reason": r.stop_string}])
                    if include_usage:
                        yield chunk([], usage=self.usage(results))
                    yield "data: [DONE]\n\n"
                finally:
                    if not task.done():  # the client went away (the response was cancelled): stop generating
                        self.cancel.set()
                        task.cancel()

            return _Stream(events(), self.ticket.close)

    # ------------------------------------------------------------------------------- the dialogue as a model

    async def _dialogue(request: Request, body: ChatBody, model: str, messages: list[dict]) -> Response:
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "").strip()
        if not question:
            raise APIError(400, f"{model} answers the last user message; there is none", param="messages")
        try:
            ticket = service.reserve_dialogue()
        except Busy as error:
            raise APIError(429, str(error), "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(limits.retry_after)}) from None
        cancel = threading.Event()
        solver_only = DIALOGUE_MODELS[model]
        rid, created = new_id("chatcmpl"), int(time.time())
        if not body.stream:
            task = asyncio.ensure_future(service.dialogue(ticket, question, solver_only=solver_only, cancel=cancel))
            try:
                while not (await asyncio.wait({task}, timeout=POLL_SECONDS))[0]:
                    if await request.is_disconnected():
                        cancel.set()
                        await asyncio.wait({task})
                        raise APIError(499, "the client closed the request", code="client_closed")
            finally:
                if not task.done():
                    cancel.set()
                ticket.close()
            result = task.result()
            choice = {"index": 0, "message": {"role": "assistant", "content": explain(result)},
                      "logprobs": None, "finish_reason": "stop", "stop_reason": None}
            data = envelope("chatcmpl", "chat.completion", model, [choice], dialogue_usage(result), rid=rid)
            data["duet"] = dialogue_summary(result)
            data["duet_transcript"] = result.to_dict()
            return JSONResponse(json.loads(json.dumps(data, default=str)))

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
            data = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(data, ensure_ascii=False, default=str)}\n\n"

        async def events() -> AsyncIterator[str]:
            queue: asyncio.Queue = asyncio.Queue()
            task = asyncio.ensure_future(service.dialogue(ticket, question, solver_only=solver_only, cancel=cancel,
                                                          on_event=queue.put_nowait))
            task.add_done_callback(lambda _: queue.put_nowait(None))
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (event := await queue.get()) is not None:
                    text = event_text(event)
                    if event.kind == "delta":
                        yield chunk({"reasoning_content": text})
                    else:
                        yield chunk({"reasoning_content": text} if text else {}, duet_event=event.to_dict())
                result = task.result()
                yield chunk({"content": explain(result)})
                extra: dict[str, Any] = {"duet": dialogue_summary(result), "duet_transcript": result.to_dict()}
                if usage_requested(body):
                    extra["usage"] = dialogue_usage(result)
                yield chunk({}, "stop", **extra)
                yield "data: [DONE]\n\n"
            finally:
                if not task.done():
                    cancel.set()

        return _Stream(events(), ticket.close)

    app.add_middleware(_CountRequests, service=service)
    return app


STARTED = time.time()


class _CountRequests:
    """Counts every answered request of a known route by endpoint, model and status (for /metrics)."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in ROUTES:
            await self.app(scope, receive, send)
            return
        status = 500

        async def counted(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            model = scope.get("state", {}).get("model", "")
            self.service.metrics.request(scope["path"], model, status)
