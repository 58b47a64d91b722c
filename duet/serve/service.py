"""The engine behind the server's endpoints, with no HTTP in it.

* Admission: a request takes one slot per generation (``n`` choices, several prompts) from a bounded pool of
  ``max_batch + max_queue``; when the pool is empty it is refused at once (:class:`Busy`, the app's 429) instead
  of waiting without bound. A slot is given back when its generation has really ended in the engine.
* Generation: ``Engine.submit`` blocks, so each generation runs in a worker thread; streamed text comes back to
  the event loop with ``call_soon_threadsafe``. Requests from all clients meet in the engine's one batch
  (continuous batching). A ``cancel`` event per request stops its rows at the next decoding step.
* Log-probabilities: the engine records them while it decodes (the main model's distribution at temperature 1,
  MTP or not): each token's own, and the top k asked for.
* The dialogue as a model: ``run_dialogue`` with the server's engine as the solver's and critic's backend, the
  dialogue config from the server's settings (sandbox limits included; never from a request).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from duet.engine import Engine, GenerationResult, SamplingParams
from duet.serve.metrics import Metrics


@dataclass
class Limits:
    """What one request may ask for, and how much the server takes on at once."""

    max_queue: int = 256  # generations waiting beyond the engine's batch rows before 429
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    default_max_tokens: int = 1024  # max_tokens when a request gives none (capped by the context left)
    max_request_bytes: int = 1 << 20  # request bodies above this are refused (413)
    max_n: int = 16  # choices per request
    max_dialogues: int = 4  # solver-critic dialogues running at once (each makes many engine requests)
    retry_after: int = 1  # seconds a 429 asks the client to wait


class Busy(Exception):
    """The queue (or the dialogue pool) is full: answer 429 with Retry-After."""


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


class Ticket:
    """Slots held by one request. Each generation marks its slot started when it is handed to a worker and gives
    it back when it has ended in the engine; `close` gives back the slots never started (a request that failed,
    or a stream whose client left before it began). Started and closed from the event loop only."""

    def __init__(self, release: Callable[[int], None], count: int) -> None:
        self._release, self.unstarted = release, count

    def start(self) -> None:
        self.unstarted -= 1

    def done(self) -> None:
        self._release(1)

    def close(self) -> None:
        count, self.unstarted = self.unstarted, 0
        if count > 0:
            self._release(count)


class Service:
    """One engine served to many clients."""

    def __init__(self, engine: Engine, model_id: str, *, limits: Limits | None = None,
                 dialogue_config: Any = None) -> None:
        self.engine = engine
        self.model_id = model_id
        self.limits = limits or Limits()
        self.metrics = Metrics()
        self.capacity = engine.max_batch + self.limits.max_queue
        self.dialogue_config = dialogue_config
        self._lock = threading.Lock()
        self._in_flight = 0
        self._dialogues = 0
        self._pool = ThreadPoolExecutor(max_workers=self.capacity, thread_name_prefix="duet-serve")
        self._dialogue_pool = ThreadPoolExecutor(max_workers=max(1, self.limits.max_dialogues),
                                                 thread_name_prefix="duet-serve-dialogue")
        self._dialogue_backend: Any = None

    # ------------------------------------------------------------------ admission

    def reserve(self, count: int) -> Ticket:
        """Slots for `count` generations, or Busy when the queue has no room for them all."""
        with self._lock:
            if self._in_flight + count > self.capacity:
                raise Busy(f"the server is busy ({self._in_flight} generations in flight, room for "
                           f"{self.capacity}); retry in {self.limits.retry_after} s")
            self._in_flight += count
        return Ticket(self._release, count)

    def _release(self, count: int) -> None:
        with self._lock:
            self._in_flight -= count

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # ------------------------------------------------------------------ prompts

    def chat_prompt(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> list[int]:
        """Chat messages -> prompt ids through the checkpoint's chat template (vLLM's two template options)."""
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the model has no chat template; use /v1/completions")
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message)
        return self.engine.encode(text)

    def check_prompt(self, ids: list[int]) -> None:
        """ValueError (the app's 400) for an empty prompt or one the context cannot hold."""
        if not ids:
            raise ValueError("the prompt is empty")
        room = self.engine.max_seq_len - len(ids) - max(1, 2 * self.engine.mtp_depth - 1)
        if room < 1:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {self.engine.max_seq_len} "
                             "(maximum context length)")

    # ------------------------------------------------------------------ generation

    async def generate(self, ticket: Ticket, prompt: list[int], params: Sequence[SamplingParams],
                       cancel: threading.Event,
                       on_text: Callable[[int, str], None] | None = None) -> list[GenerationResult]:
        """One generation per params, in the engine's batch; `on_text(index, text)` runs in the event loop."""
        loop = asyncio.get_running_loop()

        def emit(i: int, text: str) -> None:
            try:
                loop.call_soon_threadsafe(on_text, i, text)
            except RuntimeError:  # the loop has closed (shutdown): nobody is listening
                cancel.set()

        def job(i: int, p: SamplingParams) -> GenerationResult:
            try:
                result = self.engine.submit(prompt, p, on_text=None if on_text is None else (lambda t: emit(i, t)),
                                            cancel=cancel)
                self.metrics.generation(result)
                return result
            finally:
                ticket.done()

        futures = []
        for i, p in enumerate(params):
            ticket.start()
            handed = self._pool.submit(job, i, p)
            # cancelled before a worker took it (the client left at once), the job never runs to give its slot back
            handed.add_done_callback(lambda f: ticket.done() if f.cancelled() else None)
            futures.append(asyncio.wrap_future(handed, loop=loop))
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:  # a failure, or this task was cancelled (the client went away): stop the rest
            cancel.set()
            raise

    def logprobs(self, result: GenerationResult, top: int) -> list[TokenLogprob]:
        """The log-probability of each token of `result` and the `top` likeliest there (asked for with
        `SamplingParams.logprobs = top`)."""
        text = self.token_text
        alternatives = result.top_logprobs or [[] for _ in result.token_ids]
        return [TokenLogprob(text(t), lp, [(text(i), v) for i, v in alts[:top]])
                for t, lp, alts in zip(result.token_ids, result.token_logprobs, alternatives, strict=True)]

    def token_text(self, token: int) -> str:
        return self.engine.tokenizer.decode([token])

    # ------------------------------------------------------------------ the dialogue as a model

    def reserve_dialogue(self) -> Ticket:
        with self._lock:
            if self._dialogues >= self.limits.max_dialogues:
                raise Busy(f"{self._dialogues} dialogues are running, the most this server runs at once; "
                           f"retry in {self.limits.retry_after} s")
            self._dialogues += 1
        return Ticket(self._release_dialogue, 1)

    def _release_dialogue(self, count: int) -> None:
        with self._lock:
            self._dialogues -= count

    async def dialogue(self, ticket: Ticket, question: str, *, solver_only: bool, cancel: threading.Event,
                       on_event: Callable[[Any], None] | None = None) -> Any:
        """Run the solver-critic dialogue (solver only with `solver_only`) on `question`; returns its
        `DialogueResult`. `on_event(event)` runs in the event loop."""
        from duet.agents.dialogue import DialogueConfig, run_dialogue

        loop = asyncio.get_running_loop()
        config = replace(self.dialogue_config or DialogueConfig(), critic=not solver_only)
        backend = self.dialogue_backend()

        def emit(event: Any) -> None:
            try:
                loop.call_soon_threadsafe(on_event, event)
            except RuntimeError:
                cancel.set()

        def job() -> Any:
            try:
                result = run_dialogue(question, backend, config=config, cancel=cancel,
                                      on_event=None if on_event is None else emit)
                self.metrics.dialogue(result)
                return result
            finally:
                ticket.done()

        ticket.start()
        try:
            return await loop.run_in_executor(self._dialogue_pool, job)
        except BaseException:
            cancel.set()
            raise

    def dialogue_backend(self) -> Any:
        if self._dialogue_backend is None:
            from duet.agents.local_backend import LocalBackend

            self._dialogue_backend = LocalBackend(self.engine, f"local:{self.model_id}")
        return self._dialogue_backend

    def shutdown(self) -> None:
        for pool in (self._pool, self._dialogue_pool):
            pool.shutdown(wait=False, cancel_futures=True)
