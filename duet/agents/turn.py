"""One tool-integrated turn: generate, run the code, append its output, continue, until the turn ends.

Both agents use this loop (the protocol is in :mod:`duet.agents.protocol`). Each turn gets its own
sandbox session, opened on the first code cell (a turn without code starts no process), so a
turn's transcript can be replayed on its own and the critic never shares the solver's state.
Every failure ends the turn with a ``finish`` and a one-line ``error``; nothing is raised.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from duet.agents.backends import Backend, BackendError, Completion, ContextFullError, Message, Request, one_line
from duet.agents.events import Emitter, EventCallback, log
from duet.agents.protocol import (
    NO_CODE,
    OUTPUT_LIMIT,
    STEP_LIMIT_NOTE,
    STOP,
    extract_final_answer,
    find_code_blocks,
    format_output,
    output_block,
    prose,
)
from duet.agents.transcript import Step, Turn
from duet.sandbox import RunResult


class SandboxSession(Protocol):
    """What a turn needs from a sandbox session (``duet.sandbox.Sandbox`` provides it)."""

    def run(self, code: str) -> RunResult:
        """Run a cell."""
        ...


SandboxFactory = Callable[[], AbstractContextManager[SandboxSession]]


@dataclass
class TurnOptions:
    """Limits and hooks shared by every turn of a dialogue."""

    sandbox_factory: SandboxFactory
    max_steps: int = 8
    max_tokens: int = 1024
    temperature: float = 0.0
    seed: int | None = None
    output_chars: int = OUTPUT_LIMIT
    on_event: EventCallback | None = None
    cancel: threading.Event | None = None

    def cancelled(self) -> bool:
        """True once the cancel flag is set."""
        return self.cancel is not None and self.cancel.is_set()


def run_turn(
    backend: Backend,
    messages: Sequence[Message],
    options: TurnOptions,
    *,
    agent: str,
    round: int,
    task: str,
    budget: int | None = None,
) -> Turn:
    """Run one turn of ``agent`` on ``messages``; ``budget`` caps the tokens it may generate."""
    emit = Emitter(options.on_event, agent, round)
    model = backend.name
    turn = Turn(agent, round, task, model, [dict(m) for m in messages])
    emit("turn_start", model=turn.model, task=task)
    started = time.perf_counter()
    stack = contextlib.ExitStack()
    loop = _TurnLoop(backend, list(messages), options, turn, emit, stack, budget)
    try:
        loop.run()
    finally:
        turn.text = loop.text
        try:
            stack.close()  # ends the sandbox session, if one was opened
        except Exception:
            log.warning("closing the sandbox failed", exc_info=True)
    turn.answer = extract_final_answer(turn.text)
    turn.confidence = confidence(loop.logprobs)
    turn.seconds = time.perf_counter() - started
    return turn


def confidence(logprobs: list[float] | None) -> dict[str, float] | None:
    """{"mean", "min", "tokens"} of the log-probabilities of a turn's generated tokens (None: none given)."""
    if not logprobs:
        return None
    return {"mean": round(sum(logprobs) / len(logprobs), 5), "min": round(min(logprobs), 5),
            "tokens": len(logprobs)}


def end_turn(turn: Turn, options: TurnOptions) -> None:
    """Emit the ``turn_end`` event of ``turn``."""
    Emitter(options.on_event, turn.agent, turn.round)(
        "turn_end",
        finish=turn.finish,
        prompt_tokens=turn.prompt_tokens,
        completion_tokens=turn.completion_tokens,
        seconds=round(turn.seconds, 3),
    )


class _TurnLoop:
    """The state of one turn while it runs (split out of run_turn to keep each piece small)."""

    def __init__(
        self,
        backend: Backend,
        messages: list[Message],
        options: TurnOptions,
        turn: Turn,
        emit: Emitter,
        stack: contextlib.ExitStack,
        budget: int | None,
    ) -> None:
        self.backend, self.messages, self.options = backend, messages, options
        self.turn, self.emit, self.stack, self.budget = turn, emit, stack, budget
        self.text = ""
        self.cells = 0
        self.nudged = False
        self.sandbox: SandboxSession | None = None
        self.logprobs: list[float] | None = []  # of every generated token; None once a completion gave none

    def run(self) -> None:
        while self._generate():
            pass

    def _finish(self, finish: str, error: str | None = None) -> bool:
        self.turn.finish = finish
        if error:
            self.turn.error = one_line(error)
            self.emit("error", self.turn.error, reason=finish)
        return False

    def _generate(self) -> bool:
        """One backend call and what follows; False when the turn is over."""
        opts, turn = self.options, self.turn
        if opts.cancelled():
            return self._finish("interrupted")
        turn_left = opts.max_tokens - turn.completion_tokens
        budget_left = None if self.budget is None else self.budget - turn.completion_tokens
        allowed = turn_left if budget_left is None else min(turn_left, budget_left)
        budget_bound = budget_left is not None and budget_left < turn_left
        if allowed <= 0:
            return self._finish("token_budget" if budget_bound else "length")
        messages = self.messages + ([{"role": "assistant", "content": self.text}] if self.text else [])
        try:
            done = self.backend.complete(
                messages,
                Request(stop=(STOP,), max_tokens=allowed, temperature=opts.temperature, seed=opts.seed),
                on_text=self.emit.delta,
                cancel=opts.cancel,
            )
        except ContextFullError as error:
            return self._finish("context_full", str(error))
        except BackendError as error:
            return self._finish("backend_error", str(error))
        except Exception as error:  # a backend bug must still end in a clear result
            return self._finish("backend_error", f"{type(error).__name__}: {error}")
        turn.prompt_tokens += done.prompt_tokens
        turn.completion_tokens += done.completion_tokens
        turn.reasoning += done.reasoning
        if self.logprobs is not None and done.token_logprobs is not None:
            self.logprobs += done.token_logprobs
        else:
            self.logprobs = None
        segment = done.text
        self.text += segment
        blocks = find_code_blocks(segment)
        if done.finish_reason == "cancelled":
            self._emit_prose(segment)
            return self._finish("interrupted")
        if done.finish_reason == "length":
            self._emit_prose(segment)
            if blocks and not blocks[-1].closed:
                self.emit("error", "a code block cut off by the token limit was not run", reason="length")
            return self._finish("token_budget" if budget_bound else "length")
        if done.finish_reason != "stop" and not _trailing_cell(segment, blocks) and not _stripped_stop(done, segment,
                                                                                                        blocks):
            self._emit_prose(segment)
            if blocks and not blocks[-1].closed:
                self.emit("error", "unterminated code block at the end of the turn was not run", reason="eos")
            return self._finish("eos")
        return self._cell(segment, blocks)

    def _cell(self, segment: str, blocks: list) -> bool:
        """Run the code of ``segment`` (or explain why not) and append its output block."""
        if blocks and not blocks[-1].closed:
            self.text += ("" if self.text.endswith("\n") else "\n") + "```\n"
        elif not self.text.endswith("\n"):
            self.text += "\n"
        self.cells += 1
        step_text = prose(segment[: blocks[0].start] if blocks else segment).strip()
        if step_text:
            self.emit("step", step_text)
        code = "\n\n".join(b.code for b in blocks)
        if self.cells > self.options.max_steps:
            if self.nudged:
                return self._finish("max_steps")
            self.nudged = True
            return self._append(Step(step_text, code, STEP_LIMIT_NOTE, ok=False, error="step limit"))
        if not blocks:
            return self._append(Step(step_text, "", NO_CODE, ok=False, error="no code"))
        n = len(self.turn.steps) + 1
        self.emit("code", code, step=n)
        if self.options.cancelled():
            return self._finish("interrupted")
        try:
            if self.sandbox is None:
                self.sandbox = self.stack.enter_context(self.options.sandbox_factory())
            result = self.sandbox.run(code)
        except Exception as error:
            return self._finish("sandbox_error", f"sandbox failed: {type(error).__name__}: {error}")
        step = _step_from_result(step_text, code, result, self.options.output_chars)
        self.emit(
            "output",
            step.output,
            step=n,
            ok=step.ok,
            error=step.error,
            seconds=round(step.seconds, 3),
            state_lost=step.state_lost,
            truncated=step.truncated,
        )
        return self._append(step)

    def _append(self, step: Step) -> bool:
        self.turn.steps.append(step)
        self.text += output_block(step.output)
        return True

    def _emit_prose(self, segment: str) -> None:
        text = prose(segment).strip()
        if text:
            self.emit("step", text)


def _trailing_cell(segment: str, blocks: list) -> bool:
    r"""The model ended its turn right after a closed code block, with no \boxed answer: run it."""
    return (
        bool(blocks)
        and blocks[-1].closed
        and not segment[blocks[-1].end :].strip()
        and extract_final_answer(segment) is None
    )


def _stripped_stop(done: Completion, segment: str, blocks: list) -> bool:
    """A server ended on a stop string or the end of the turn without saying which (llama.cpp strips the
    stop string): a piece that ends with a code block, closed or not, ended where the model opened the
    output fence, as if the stop string had matched."""
    return done.stop_unknown and bool(blocks) and not segment[blocks[-1].end :].strip()


def _step_from_result(step_text: str, code: str, result: RunResult, limit: int) -> Step:
    output = format_output(result.stdout, result.stderr, result.error, result.ok, state_lost=result.state_lost,
                           truncated=result.truncated, limit=limit)
    return Step(
        step_text,
        code,
        output,
        ok=result.ok,
        error=one_line(result.error) if result.error else None,
        seconds=result.seconds,
        state_lost=result.state_lost,
        truncated=result.truncated,
    )
