"""The critic as a verifier: how likely a solution is right, and a vote among sampled solutions.

A critic that re-solves a problem the way the solver did makes the same mistakes and agrees with them.
A verifier *judges* instead: the critic model reads the problem and a solution and is asked for a verdict
only (``prompts/verifier_user.md``); the probability it gives to AGREE at that point is the solution's
score, P(correct). The embedded model is trained on such judgements of right and wrong solutions.

With a :class:`ConfidenceHead` beside the model's weights and a solution whose turn carries the
log-probabilities of the tokens the solver wrote (``Turn.confidence``), the head gives the score from them
with no request at all (``method="confidence"``): how sure the model was of its solution measures far
better than its verdict. Otherwise, where the backend returns log-probabilities (duet's engine; vLLM and
SGLang), the score is P(AGREE) / (P(AGREE) + P(DISAGREE)) over the first token of the verdict
(``method="logprobs"``); where it does not, the verdict text decides: 1.0 for AGREE, 0.0 otherwise
(``method="text"``).

When the solver's answer scores below a threshold, the solver samples K alternatives (decoded together
with the rest of the batch, each in its own sandbox), the verifier scores each, and the answers vote
with their scores as weights (:func:`verifier_vote`).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from duet.agents.backends import Backend, BackendError, Request
from duet.agents.number_check import number_features
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
    method: str  # "confidence" (the head) | "logprobs" (P(AGREE) of the verdict) | "text" (the verdict's word)
    prompt_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"p": round(self.p, 4), "method": self.method}


@dataclass(frozen=True)
class ConfidenceHead:
    """P(correct) from how sure the model was of what it wrote and what the number check finds: a logistic
    regression over the mean and the minimum log-probability of the tokens of its solution (``Turn.confidence``)
    and, when fitted with them, the number check's findings (``number_features``: a number the problem does not
    give, given numbers left unused, ``a - a``). Fitted on the model's own solutions to training problems
    labelled right or wrong (``python -m duet.train.verifier_head``) and stored beside its weights. On the
    embedded model it separates right from wrong answers far better than the verdict's P(AGREE), and the
    number features rank the samples of one problem better than confidence alone (``MODEL_CARD.md``)."""

    weights: dict[str, float]  # feature -> weight
    bias: float

    FILE = "verifier_head.json"
    CONFIDENCE = ("mean", "min")  # of Turn.confidence
    NUMBERS = ("ungrounded", "unused", "reused")  # of number_features

    def p(self, features: dict[str, float]) -> float:
        z = self.bias + sum(w * float(features[name]) for name, w in self.weights.items())
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    def features(self, question: str, solution: str, confidence: dict[str, float]) -> dict[str, float]:
        """What the head reads of a solution: its confidence, and its number features when the head uses them."""
        if set(self.weights) & set(self.NUMBERS):
            return {**confidence, **number_features(question, solution)}
        return confidence

    @classmethod
    def load(cls, directory: Path) -> ConfidenceHead | None:
        """The head stored in model ``directory``; None when it has none. Raises BackendError when the file is
        not a head (one line that says so)."""
        path = Path(directory) / cls.FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            weights = {str(k): float(v) for k, v in data["weights"].items()}
            known = {*cls.CONFIDENCE, *cls.NUMBERS}
            if not set(weights) <= known:
                raise ValueError(f"unknown features {sorted(set(weights) - known)}")
            return cls(weights, float(data["bias"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise BackendError(f"{path}: not a verifier head ({type(e).__name__}: {e}); delete it, or fit it "
                               "again with python -m duet.train.verifier_head") from None

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "bias": self.bias}


class Verifier:
    """Scores (problem, solution) pairs with one backend (the critic's): with the backend's
    :class:`ConfidenceHead` when it has one and the solution's turn has log-probabilities, else with the
    verdict's P(AGREE)."""

    def __init__(self, backend: Backend, prompts: Prompts) -> None:
        self.backend = backend
        self.prompts = prompts
        self.head: ConfidenceHead | None = getattr(backend, "verifier_head", None)

    def messages(self, question: str, solution: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.prompts.critic_system},
                {"role": "user", "content": self.prompts.verifier_request(question, solution)},
                {"role": "assistant", "content": VERDICT_PREFIX}]

    def score(self, question: str, solution: str, cancel: threading.Event | None = None, *,
              confidence: dict[str, float] | None = None) -> Score:
        """P(correct) of ``solution`` (``confidence``: its turn's, when known); raises BackendError when the
        backend fails."""
        if self.head is not None and confidence:
            return Score(self.head.p(self.head.features(question, solution, confidence)), "confidence")
        completion = self.backend.complete(self.messages(question, solution), VERDICT_REQUEST, cancel=cancel)
        first = (completion.top_logprobs or [None])[0]
        if first:
            agree = sum(math.exp(lp) for tok, lp in first.items() if tok.strip().upper().startswith("A"))
            disagree = sum(math.exp(lp) for tok, lp in first.items() if tok.strip().upper().startswith("D"))
            if agree + disagree > 0:
                return Score(agree / (agree + disagree), "logprobs", completion.prompt_tokens, completion.seconds)
        verdict = parse_verdict(f"{VERDICT_PREFIX}{completion.text}")
        return Score(1.0 if verdict.kind == AGREE else 0.0, "text", completion.prompt_tokens, completion.seconds)


# How much more weight another answer needs to overturn the solver's first one: a near tie of noisy scores is
# no reason to change a right answer (on the dev and challenge splits, 0.1 kept every fix of 0 and broke none).
VOTE_MARGIN = 0.1


@dataclass(frozen=True)
class Ballot:
    """One solution's say in the verifier's vote: its answer, its score, and what the number check finds in it
    (:func:`doubts`)."""

    answer: str | None
    p: float
    doubts: float = 0.0
    method: str | None = None  # how ``p`` was read (Score.method)


def doubts(question: str, solution: str) -> float:
    """What the number check finds in ``solution``: ``number_features`` summed (a number the problem does not
    give, each given number left unused, a reused number)."""
    return sum(number_features(question, solution).values())


def verifier_vote(ballots: Sequence[Ballot]) -> tuple[str | None, list[dict]]:
    """The verifier's choice among solutions of one problem; ``ballots[0]`` is the solver's first answer.

    Only the solutions with the fewest doubts vote, weighted by score; the heaviest answer wins, except that the
    solver's first answer (when it votes) stands unless another outweighs it by more than VOTE_MARGIN. The score
    is mostly the model's confidence, which tells an easy problem from a hard one but hardly one sample of a
    problem from another (a sample is less sure than greedy decoding whether it is right or not); a solution that
    reuses a number or leaves one unused is wrong far more often than one that does not (on the challenge split's
    samples a reused number is in 0.4% of the right solutions and 24% of the wrong ones). Ballots with equal
    doubts (all 0 when the number check is off) make it the plain weighted vote with the first answer's margin.
    Returns (the answer, the vote's groups as :func:`weighted_vote` gives them)."""
    fewest = min((b.doubts for b in ballots), default=0.0)
    kept = [b for b in ballots if b.doubts == fewest]
    winner, votes = weighted_vote([b.answer for b in kept], [b.p for b in kept])
    first = ballots[0] if ballots else None
    if winner is not None and first is not None and first.answer is not None and first.doubts == fewest \
            and not equivalent(winner, first.answer):
        held = sum(g["weight"] for g in votes if equivalent(g["answer"], first.answer))
        if votes[0]["weight"] - held <= VOTE_MARGIN:
            return first.answer, votes
    return winner, votes


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
                score = self.verifier.score(self.question, turn.text, options.cancel, confidence=turn.confidence)
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


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the ROC curve: the probability that a random positive scores above a random negative
    (ties count a half), by the Mann-Whitney rank sum; None without both classes."""
    positives = sum(1 for y in labels if y)
    negatives = len(labels) - positives
    if len(scores) != len(labels):
        raise ValueError("scores and labels must have the same length")
    if not positives or not negatives:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels, strict=True) if y)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
