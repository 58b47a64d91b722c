"""The critic as a verifier: how likely a solution is right, and a vote among sampled solutions.

A critic that re-solves a problem the way the solver did makes the same mistakes and agrees with them.
A verifier *judges* instead: the critic model reads the problem and a solution and is asked for a verdict
only (``prompts/verifier_user.md``); the probability it gives to AGREE at that point is the solution's
score, P(correct). The embedded model is trained on such judgements of right and wrong solutions.

Where the backend returns log-probabilities (duet's engine; vLLM and SGLang), the score is
P(AGREE) / (P(AGREE) + P(DISAGREE)) over the first token of the verdict (``method="logprobs"``); where it
does not, the verdict text decides: 1.0 for AGREE, 0.0 otherwise (``method="text"``).

When the solver's answer scores below a threshold, the solver samples K alternatives (decoded together
with the rest of the batch, each in its own sandbox), the verifier scores each, and the answers vote
with their scores as weights (:func:`weighted_vote`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from duet.agents.backends import Backend, BackendError, Request
from duet.agents.protocol import AGREE, parse_verdict
from duet.agents.transcript import Turn
from duet.agents.turn import TurnOptions, run_turn
from duet.answers import equivalent
from duet.prompts import Prompts

VERDICT_PREFIX = "VERDICT:"
TOP_LOGPROBS = 5  # alternatives asked for at the verdict's first token
VERDICT_REQUEST = Request(stop=("\n",), max_tokens=4, temperature=0.0, logprobs=TOP_LOGPROBS)


@dataclass
class Score:
    """A verifier's judgement of one solution: P(correct), and how it was read."""

    p: float
    method: str  # "logprobs" | "text"
    prompt_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"p": round(self.p, 4), "method": self.method}


class Verifier:
    """Scores (problem, solution) pairs with one backend (the critic's)."""

    def __init__(self, backend: Backend, prompts: Prompts) -> None:
        self.backend = backend
        self.prompts = prompts

    def messages(self, question: str, solution: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.prompts.critic_system},
                {"role": "user", "content": self.prompts.verifier_request(question, solution)},
                {"role": "assistant", "content": VERDICT_PREFIX}]

    def score(self, question: str, solution: str, cancel: threading.Event | None = None) -> Score:
        """P(correct) of ``solution``; raises BackendError when the backend fails."""
        completion = self.backend.complete(self.messages(question, solution), VERDICT_REQUEST, cancel=cancel)
        first = (completion.top_logprobs or [None])[0]
        if first:
            agree = sum(math.exp(lp) for tok, lp in first.items() if tok.strip().upper().startswith("A"))
            disagree = sum(math.exp(lp) for tok, lp in first.items() if tok.strip().upper().startswith("D"))
            if agree + disagree > 0:
                return Score(agree / (agree + disagree), "logprobs", completion.prompt_tokens, completion.seconds)
        verdict = parse_verdict(f"{VERDICT_PREFIX}{completion.text}")
        return Score(1.0 if verdict.kind == AGREE else 0.0, "text", completion.prompt_tokens, completion.seconds)


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float]) -> tuple[str | None, list[dict]]:
    """The answer with the most weight, up to equivalence (ties: the one given first), and the groups
    ``[{"answer", "weight", "count"}, ...]`` heaviest first. Missing answers do not vote."""
    groups: list[dict[str, Any]] = []
    for answer, weight in zip(answers, weights, strict=True):
        if answer is None:
            continue
        for group in groups:
            if equivalent(group["answer"], answer):
                group["weight"] += weight
                group["count"] += 1
                break
        else:
            groups.append({"answer": answer, "weight": weight, "count": 1})
    ranked = sorted(groups, key=lambda g: -g["weight"])
    return (ranked[0]["answer"] if ranked else None), ranked


class Samples:
    """K solver turns on one problem sampled at ``temperature`` (seeds ``seed + 1 + i``), each in its own
    sandbox, and, with a verifier, their scores. On a backend that serves requests concurrently they start
    at once in threads, so the engine decodes them in one batch; otherwise in order, on the first
    ``results()`` call (scripted replies are then consumed deterministically). Their turns are silent (no
    live events: they would interleave with the solver's stream)."""

    def __init__(self, backend: Backend, verifier: Verifier | None, prompts: Prompts, question: str,
                 options: TurnOptions, k: int, temperature: float, *, agent: str = "solver",
                 task: str = "sample") -> None:
        base = options.seed or 0
        self.question, self.verifier, self.backend = question, verifier, backend
        self.agent, self.task, self.k = agent, task, k
        self._jobs = [([{"role": "system", "content": prompts.solver_system},
                        {"role": "user", "content": prompts.solver_question(question)}],
                       replace(options, temperature=temperature, seed=base + 1 + i, on_event=None))
                      for i in range(k)]
        self._futures: list[Future] | None = None
        self._done: list[tuple[Turn, Score | None]] | None = None
        if getattr(backend, "concurrent", False):
            pool = ThreadPoolExecutor(max_workers=max(1, k), thread_name_prefix="duet-samples")
            self._futures = [pool.submit(self._one, *job) for job in self._jobs]
            pool.shutdown(wait=False)

    @property
    def started(self) -> bool:
        """Whether the turns are running or done (a non-concurrent backend starts them on ``results()``)."""
        return self._futures is not None or self._done is not None

    def _one(self, messages: list[dict], options: TurnOptions) -> tuple[Turn, Score | None]:
        turn = run_turn(self.backend, messages, options, agent=self.agent, round=1, task=self.task)
        score = None
        if self.verifier is not None and turn.answer is not None and not options.cancelled():
            try:
                score = self.verifier.score(self.question, turn.text, options.cancel)
            except BackendError as error:
                turn.error = turn.error or str(error)
        if self.verifier is not None:
            turn.score = score.to_dict() if score else None
        return turn, score

    def results(self) -> list[tuple[Turn, Score | None]]:
        """The sampled turns with their scores (waits for them)."""
        if self._done is None:
            if self._futures is not None:
                self._done = [f.result() for f in self._futures]
            else:
                self._done = [self._one(*job) for job in self._jobs]
        return self._done
