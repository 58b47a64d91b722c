r"""Evaluation modes (``--modes``): what runs on each problem, and the record it leaves.

=======================  ==========================================================================
mode                     what runs
=======================  ==========================================================================
``solver+critic``        the full dialogue (solve, critique, revise ... up to ``--max-rounds``)
``solver-only``          one solver turn, no critic
``no-code``              one solver turn *without the sandbox*: the solver is told to answer in words,
                         and a code block it writes anyway is not executed (its output block says
                         :data:`NO_CODE_MESSAGE`), so no code ever runs
``no-code+critic``       the dialogue with neither agent running code
``self-consistency@k``   k solver-only samples at ``--sc-temperature`` with distinct seeds; the answer is
                         the majority over equivalent answers (ties: the answer sampled first)
``verifier@k``           the greedy solution and k samples (at ``--sample-temperature``), every one scored
                         by the critic's verifier; the answer is their vote as the dialogue takes it
                         (``duet.agents.verifier.verifier_vote``: with the number check on, the
                         solutions it doubts least vote, weighted by score). The record
                         also holds greedy's, the plain majority's and pass@k's outcomes, and greedy's
                         score: the ceiling and the parts of what the dialogue's verifier can buy
=======================  ==========================================================================

Aliases: ``solver`` = solver-only, ``critic`` / ``dialogue`` = solver+critic, ``sc@k`` =
self-consistency@k.

Seeds: each problem gets its own seed derived from ``--seed`` and its id (sample ``i`` of
self-consistency from ``--seed``, the id and ``i``), so a resumed run samples exactly what an
uninterrupted one would, and solver-only and solver+critic see the same first solver turn.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from duet.agents.backends import Backend, BackendError
from duet.agents.dialogue import DialogueConfig, run_dialogue
from duet.agents.transcript import DialogueResult
from duet.agents.verifier import Ballot, Verifier, doubts, verifier_vote
from duet.answers import equivalent, majority
from duet.answers.numbers import numbers_as_digits
from duet.app.errors import UsageProblem
from duet.evaluation.datasets import Problem
from duet.prompts import Prompts, no_code_prompts
from duet.sandbox import RunResult

NO_CODE_MESSAGE = r"code execution is disabled in this mode: reason in words and write \boxed{answer}"
FAILED = ("backend_error", "sandbox_error", "error")
"""Stop reasons that count as errors in the summary (``error``: duet eval itself failed on the problem)."""

_ALIASES = {"solver": "solver-only", "critic": "solver+critic", "dialogue": "solver+critic"}
_BASE = {
    "solver+critic": (True, True),
    "solver-only": (False, True),
    "no-code": (False, False),
    "no-code+critic": (True, False),
}
_SC = re.compile(r"(?:self-consistency|sc)@(\d+)")
_VERIFIER = re.compile(r"verifier@(\d+)")


@dataclass(frozen=True)
class Mode:
    """A canonical mode: ``critic`` (the critic runs), ``code`` (the sandbox runs), ``samples`` (k)."""

    name: str
    critic: bool
    code: bool = True
    samples: int = 1

    @property
    def voting(self) -> bool:
        return self.name.startswith("self-consistency@")

    @property
    def verifying(self) -> bool:
        return self.name.startswith("verifier@")


def mode_names() -> str:
    return ", ".join([*_BASE, "self-consistency@k", "verifier@k"])


def parse_mode(text: str) -> Mode:
    """One mode name (or alias) -> Mode; UsageProblem (a DuetError, exit 2) for an unknown one."""
    name = _ALIASES.get(text.strip().lower(), text.strip().lower())
    if name in _BASE:
        critic, code = _BASE[name]
        return Mode(name, critic, code)
    found = _SC.fullmatch(name)
    if found:
        k = int(found.group(1))
        if not 1 <= k <= 64:
            raise UsageProblem(f"--modes: mode {text!r}: k must be between 1 and 64")
        return Mode(f"self-consistency@{k}", critic=False, code=True, samples=k)
    found = _VERIFIER.fullmatch(name)
    if found:
        k = int(found.group(1))
        if not 1 <= k <= 64:
            raise UsageProblem(f"--modes: mode {text!r}: k must be between 1 and 64")
        return Mode(f"verifier@{k}", critic=False, code=True, samples=k + 1)  # greedy, then k samples
    raise UsageProblem(f"--modes: unknown mode {text!r}; use one or more of: {mode_names()} (comma-separated)")


def parse_modes(text: str) -> list[Mode]:
    """``"solver-only,solver+critic"`` -> modes in order; duplicates and an empty list are errors."""
    modes = [parse_mode(part) for part in text.split(",") if part.strip()]
    if not modes:
        raise UsageProblem(f"--modes is empty; use one or more of: {mode_names()}")
    names = [m.name for m in modes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageProblem(f"--modes lists {', '.join(dupes)} twice")
    return modes


class NoCodeSandbox:
    """A sandbox session that runs nothing: every cell's output block says :data:`NO_CODE_MESSAGE`."""

    def __enter__(self) -> NoCodeSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run(self, code: str) -> RunResult:
        return RunResult(stdout="", stderr="", error=NO_CODE_MESSAGE, ok=False, seconds=0.0)


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from ``parts`` (stable across runs and machines)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass
class Context:
    """What every problem of a run shares."""

    solver: Callable[[], Backend]  # a backend for one dialogue (shared, or a fresh scripted one)
    critic: Callable[[], Backend | None]
    config: DialogueConfig
    prompts: Prompts
    seed: int = 0
    sc_temperature: float = 0.7
    cancel: threading.Event | None = None


class Interrupted(Exception):
    """The run was cancelled while this problem was in flight: it is not recorded."""


def run_problem(problem: Problem, mode: Mode, ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``problem`` in ``mode``; returns (record without ``transcript``/timing keys, transcript).

    Raises :class:`Interrupted` when cancelled; other failures are the caller's to record.
    """
    prompts = ctx.prompts if mode.code else no_code_prompts(ctx.prompts)
    sandbox = None if mode.code else NoCodeSandbox
    results: list[DialogueResult] = []
    for i in range(mode.samples):
        if mode.voting:
            seed = derive_seed(ctx.seed, problem.id, "sample", i)
            config = replace(ctx.config, critic=False, temperature=ctx.sc_temperature, seed=seed)
        elif mode.verifying and i > 0:
            seed = derive_seed(ctx.seed, problem.id, "sample", i)
            config = replace(ctx.config, critic=False, temperature=ctx.config.sample_temperature, seed=seed)
        elif mode.verifying:  # the greedy solution, as solver-only has it
            config = replace(ctx.config, critic=False, seed=derive_seed(ctx.seed, problem.id))
        else:
            config = replace(ctx.config, critic=mode.critic, seed=derive_seed(ctx.seed, problem.id))
        solver = ctx.solver()
        critic = ctx.critic() if mode.critic else None
        result = run_dialogue(problem.question, solver, critic, config, cancel=ctx.cancel, prompts=prompts,
                              sandbox_factory=sandbox)
        if result.stop_reason == "interrupted" or (ctx.cancel is not None and ctx.cancel.is_set()):
            raise Interrupted(problem.id)
        results.append(result)
    ballots = _ballots(problem, results, ctx) if mode.verifying else None
    record = _record(problem, mode, results, ballots)
    transcript = {"version": 1, "id": problem.id, "mode": mode.name, "question": problem.question,
                  "gold": problem.gold, "dialogues": [r.to_dict() for r in results]}
    if ballots is not None:
        transcript["scores"] = [{"p": round(b.p, 4), "method": b.method, "doubts": b.doubts} if b else None
                                for b in ballots]
    return record, transcript


def _ballots(problem: Problem, results: list[DialogueResult], ctx: Context) -> list[Ballot | None]:
    """The critic's verifier score of each solution as a ballot of the dialogue's vote, with the number check's
    doubts when it is on (None: no answer, or the backend failed). The question is read as the dialogue read it."""
    verifier = Verifier(ctx.critic() or ctx.solver(), ctx.prompts)
    question = numbers_as_digits(problem.question) if ctx.config.numbers_as_digits else problem.question
    ballots: list[Ballot | None] = []
    for r in results:
        turn = r.solver_turns[-1] if r.solver_turns else None
        if not (turn and r.answer):
            ballots.append(None)
            continue
        try:
            score = verifier.score(question, turn.text, ctx.cancel, confidence=turn.confidence)
        except BackendError:
            ballots.append(None)
            continue
        ballots.append(Ballot(r.answer, score.p, doubts(question, turn.text) if ctx.config.number_check else 0.0,
                              score.method))
    return ballots


def _record(problem: Problem, mode: Mode, results: list[DialogueResult],
            ballots: list[Ballot | None] | None = None) -> dict[str, Any]:
    tokens = {"prompt": sum(r.prompt_tokens for r in results),
              "completion": sum(r.completion_tokens for r in results)}
    record: dict[str, Any] = {"id": problem.id, "mode": mode.name, "question": problem.question, "gold": problem.gold}
    if mode.voting:
        answers = [r.answer for r in results]
        prediction, votes = majority(answers)
        failures = [r for r in results if r.stop_reason in FAILED]
        if prediction is not None:
            stop = "majority_vote"
        elif failures and len(failures) == len(results):
            stop = failures[0].stop_reason
        else:
            stop = "no_answer"
        errors = [r.error for r in results if r.error]
        record.update(prediction=prediction, agreed=None, rounds=sum(r.rounds for r in results) / len(results),
                      stop_reason=stop, error=errors[0] if errors and prediction is None else None,
                      samples=answers, votes=[{"answer": v["answer"], "count": v["count"]} for v in votes])
    elif mode.verifying:
        assert ballots is not None
        answers = [r.answer for r in results]
        weights = [b.p if b else 0.0 for b in ballots]
        prediction, votes = verifier_vote([b or Ballot(None, 0.0) for b in ballots])
        right = [equivalent(a, problem.gold) for a in answers]
        record.update(prediction=prediction, agreed=None, rounds=1,
                      stop_reason="weighted_vote" if prediction is not None else "no_answer", error=None,
                      first_prediction=answers[0], first_correct=right[0],
                      first_score=ballots[0].p if ballots[0] else None,
                      score_method=next((b.method for b in ballots if b), None),
                      majority_correct=equivalent(majority(answers)[0], problem.gold),
                      pass_at_k=any(right[1:]), samples=[{"answer": a, "p": round(w, 4), "correct": c}
                                                         for a, w, c in zip(answers, weights, right, strict=True)],
                      votes=[{"answer": v["answer"], "weight": round(v["weight"], 4), "count": v["count"]}
                             for v in votes])
    else:
        (r,) = results
        record.update(prediction=r.answer, agreed=r.agreed if mode.critic else None, rounds=r.rounds,
                      stop_reason=r.stop_reason, error=r.error)
        if mode.critic:
            first = next((t for t in r.solver_turns if t.round == 1), None)
            record["first_prediction"] = first.answer if first is not None else None
            record["first_correct"] = equivalent(record["first_prediction"], problem.gold)
            verify = next((t for t in r.critic_turns if t.task == "verify" and t.round == 1 and t.score), None)
            if verify is not None:  # the verifier's score of the solver's first answer
                record["first_score"] = verify.score["p"]
                record["score_method"] = verify.score["method"]
    record["correct"] = equivalent(record["prediction"], problem.gold)
    record["tokens"] = tokens
    record["seconds"] = round(sum(r.seconds for r in results), 4)
    return record


def error_record(problem: Problem, mode: Mode, error: BaseException) -> dict[str, Any]:
    """The record of a problem on which duet eval itself failed (the run goes on)."""
    return {"id": problem.id, "mode": mode.name, "question": problem.question, "gold": problem.gold,
            "prediction": None, "correct": False, "agreed": None, "rounds": 0, "stop_reason": "error",
            "error": f"{type(error).__name__}: {error}"[:300], "tokens": {"prompt": 0, "completion": 0},
            "seconds": 0.0}
