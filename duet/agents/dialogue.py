r"""The solver-critic dialogue: solve, critique, revise, ... until they agree or a limit is hit.

Round 1 is the solver's solution and the critic's check; each later round is a revision with the
critique, then a new check. It always terminates, with one of :data:`STOP_REASONS`:

* ``agreed``: the critic said ``VERDICT: AGREE``, or its ``\boxed{}`` answer is equivalent to the
  solver's (``duet.answers.equivalent``).
* ``max_rounds``: ``max_rounds`` solver turns were checked without agreement.
* ``token_budget``: the dialogue generated ``token_budget`` tokens (completion tokens, all turns).
* ``repeated_reply``: a revision was identical (whitespace aside) to an earlier solution of this
  dialogue; checking it again cannot change anything (except once with the verifier on: a solution kept
  after the number check questioned it goes to the verifier's vote).
* ``no_answer``: it ended (``max_rounds`` or solver-only) and the solver never gave a ``\boxed{}``
  answer. A solution without an answer is not sent to the critic: the solver is asked to revise.
* ``context_full``: the conversation outgrew the model's context window (a long revision of a small
  model); the answer so far stands.
* ``backend_error`` / ``sandbox_error``: a backend failed or timed out, or the sandbox could not run
  (``result.error`` has the one-line message). A code error or timeout *inside* a cell is not a
  failure: the model reads it in the output block and fixes the code.
* ``no_critic``: solver-only mode (``DialogueConfig(critic=False)``); one solver turn.
* ``interrupted``: the ``cancel`` event was set (Ctrl-C in the REPL).

With ``critic_solves`` (see :mod:`duet.agents.critic`) the critic's own solutions start with the
dialogue, beside the solver's first turn, and are recorded in the transcript before its first check
(``task="own_solution"``); every check of the dialogue compares with the same ones.

With ``verify`` (on by default for model backends, see :mod:`duet.agents.verifier`) the critic first
scores the solver's answer with its verifier; at or above ``verify_threshold`` it agrees. Below, the
solver samples ``samples`` alternatives (once per dialogue, each in its own sandbox, decoded together),
the verifier scores them, and the answers vote weighted by score: when another answer wins, the critic
disagrees and shows that answer's best-scored solution, which the solver's revision can follow. The
samples are recorded in the transcript (``task="sample"``) with their scores; the critic's turn holds its
score and the vote. They start as soon as a model-free check questions a solution, so that they decode beside
the solver's revision; they vote when the verifier asks for them, or at the end of a dialogue that ended
without agreement.

The final answer is the agreed answer; without agreement, the verifier-weighted vote when samples were
drawn, else the solver's last answer (from its latest turn that gave one), or None. When the critic
disagrees without a reason (or gives no verdict) the solver revises with a generic one. The critic's
reason, plus its own answer when it has one, is what the solver sees.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from duet.agents.backends import Backend
from duet.agents.critic import MODEL_FREE, NO_ANSWER_REASON, Critic, Judgement, OwnSolutions, critique_message
from duet.agents.events import Emitter, EventCallback
from duet.agents.protocol import AGREE
from duet.agents.solver import Solver
from duet.agents.transcript import DialogueResult, Turn
from duet.agents.turn import SandboxFactory, TurnOptions
from duet.answers import equivalent
from duet.answers.numbers import numbers_as_digits
from duet.prompts import Prompts, load_prompts

STOP_REASONS = (
    "agreed",
    "max_rounds",
    "token_budget",
    "repeated_reply",
    "no_answer",
    "context_full",
    "backend_error",
    "sandbox_error",
    "no_critic",
    "interrupted",
)

FAILURES = ("interrupted", "backend_error", "sandbox_error")


@dataclass
class DialogueConfig:
    """Every option of a dialogue (the CLI and the evaluator build one of these)."""

    max_rounds: int = 3
    max_steps: int = 8  # code cells per turn
    max_tokens: int = 1024  # generated tokens per turn
    token_budget: int | None = None  # generated tokens for the whole dialogue (None: no budget)
    temperature: float = 0.0
    seed: int | None = None
    critic: bool = True  # False: solver-only
    number_check: bool = True  # the critic's model-free check of the code's numbers (duet.agents.number_check)
    # the agents read the question with numbers in words and thousands separators as digits ("nine" -> "9",
    # duet.answers.numbers_as_digits); the result and the log keep the question as asked
    numbers_as_digits: bool = True
    critic_solves: int = 0  # the critic's own sampled solutions, compared before its checks (critic.py)
    critic_solve_temperature: float = 0.7
    # the critic's verifier scores answers, and low ones get sampled alternatives (verifier.py); None: on when
    # a model answers (a backend with model_backed = True), off for scripted replies, which it would desync
    verify: bool | None = None
    verify_threshold: float = 0.5
    samples: int = 4
    sample_temperature: float = 0.7
    sandbox_timeout: float = 5.0  # seconds per cell
    sandbox_memory_mb: int = 1024
    sandbox_isolation: str | None = None  # passed to Sandbox(isolation=...) when set
    output_chars: int = 1000  # cap on an output block's content
    prompt_dir: Path | None = None  # user templates overriding duet/prompts/

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options (stored in the transcript)."""
        data = asdict(self)
        data["prompt_dir"] = str(self.prompt_dir) if self.prompt_dir is not None else None
        return data


def sandbox_factory_for(config: DialogueConfig) -> SandboxFactory:
    """Sessions of the real sandbox with the config's limits (imported when the first one opens)."""

    def factory() -> Any:
        from duet.sandbox import Sandbox

        options: dict[str, Any] = {"timeout": config.sandbox_timeout, "memory_mb": config.sandbox_memory_mb}
        if config.sandbox_isolation is not None:
            options["isolation"] = config.sandbox_isolation
        return Sandbox(**options)

    return factory


class Dialogue:
    """A solver and an optional critic, each on its own backend, with one reusable conversation.

    ``run(question)`` runs a dialogue; calling it again asks a follow-up in the same solver
    conversation (the critic then sees the first question and the follow-ups). ``reset()`` starts over.
    The critic uses the solver's backend unless given its own (``critic``) or disabled in the config.
    """

    def __init__(
        self,
        solver: Backend,
        critic: Backend | None = None,
        config: DialogueConfig | None = None,
        *,
        prompts: Prompts | None = None,
        on_event: EventCallback | None = None,
        sandbox_factory: SandboxFactory | None = None,
    ) -> None:
        self.config = config or DialogueConfig()
        self.prompts = prompts or load_prompts(self.config.prompt_dir)
        self.solver = Solver(solver, self.prompts)
        self.critic = (Critic(critic or solver, self.prompts, number_check=self.config.number_check,
                              solves=self.config.critic_solves, solve_temperature=self.config.critic_solve_temperature,
                              verify=(self.config.verify if self.config.verify is not None
                                      else getattr(critic or solver, "model_backed", False)))
                       if self.config.critic else None)
        self.on_event = on_event
        self.sandbox_factory = sandbox_factory or sandbox_factory_for(self.config)
        self.questions: list[str] = []

    def reset(self) -> None:
        """Forget the conversation and earlier questions."""
        self.solver.reset()
        self.questions = []

    def run(self, question: str, *, cancel: threading.Event | None = None) -> DialogueResult:
        """Run the dialogue on ``question`` (a follow-up when a conversation exists); never raises for
        model, backend or sandbox failures: they end in the result's ``stop_reason``."""
        cfg = self.config
        options = TurnOptions(
            sandbox_factory=self.sandbox_factory,
            max_steps=cfg.max_steps,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            seed=cfg.seed,
            output_chars=cfg.output_chars,
            on_event=self.on_event,
            cancel=cancel,
        )
        asked = question
        if cfg.numbers_as_digits:
            question = numbers_as_digits(question)
        self.questions.append(question)
        run = _Run(self, options, question, self._critic_question())
        result = run.result()
        result.question = asked
        return result

    def _critic_question(self) -> str:
        first, *later = self.questions
        return "\n\n".join([first, *(f"Follow-up: {q}" for q in later)])


class _Run:
    """The state of one ``Dialogue.run`` (rounds, turns, tokens)."""

    def __init__(self, dialogue: Dialogue, options: TurnOptions, question: str, critic_question: str) -> None:
        self.d, self.options = dialogue, options
        self.question, self.critic_question = question, critic_question
        self.turns: list[Turn] = []
        self.used = 0
        self.solutions: list[str] = []
        self.questioned: set[str] = set()  # numbers the critic's number check questioned
        self.own: OwnSolutions | None = None  # the critic's own solutions, started with the dialogue
        self.own_recorded = False
        self.judgement: Judgement | None = None  # the verifier's scores and the solver's sampled alternatives
        self.answer: str | None = None
        self.error: str | None = None
        self.started = time.perf_counter()

    def budget_left(self) -> int | None:
        budget = self.d.config.token_budget
        return None if budget is None else budget - self.used

    def add(self, turn: Turn) -> Turn:
        self.turns.append(turn)
        self.used += turn.completion_tokens
        return turn

    def out_of_budget(self, turn: Turn) -> bool:
        left = self.budget_left()
        return turn.finish == "token_budget" or (left is not None and left <= 0)

    def failed(self, turn: Turn) -> str | None:
        if turn.finish in (*FAILURES, "context_full"):
            self.error = turn.error
            return turn.finish
        return "interrupted" if self.options.cancelled() else None

    def unjudged(self, turn: Turn) -> bool:
        """Whether a repeated solution still has the verifier's vote to come: the solver kept a solution that a
        model-free check (the number check) questioned, and the samples have not voted yet. The check does not
        question the same numbers twice, so the samples vote on it, whatever its score; stopping there would leave
        the questioned answer standing unjudged."""
        return (self.judgement is not None and not self.judgement.voted and turn.answer is not None
                and len(self.turns) >= 2 and self.turns[-2].model in MODEL_FREE)

    def record_own_solutions(self) -> None:
        """Add the critic's own solutions to the transcript (once; waits for them)."""
        if self.own is not None and not self.own_recorded:
            self.own_recorded = True
            for turn in self.own.turns():
                self.add(turn)

    def result(self) -> DialogueResult:
        stop, agreed, rounds = self.loop()
        if self.own is not None and self.own.started:  # ended before any check: wait for what is running
            self.record_own_solutions()
        answered_by = "agreed" if agreed else "solver"
        if self.judgement is not None and self.judgement.samples is not None:  # started: they ran, they are recorded
            if not agreed and stop not in FAILURES:  # without agreement, the verifier's vote answers
                voted = self.judgement.final_vote()
                if voted is not None:
                    self.answer, answered_by = voted, "vote"
            self.turns.extend(t for t, _ in self.judgement.samples.results())
        if stop in ("max_rounds", "no_critic") and self.answer is None:
            stop = "no_answer"
        cfg = self.d.config
        result = DialogueResult(
            question=self.question,
            answer=self.answer,
            agreed=agreed,
            rounds=rounds,
            stop_reason=stop,
            turns=self.turns,
            error=self.error,
            solver_model=self.d.solver.backend.name,
            critic_model=self.d.critic.backend.name if self.d.critic else None,
            prompt_tokens=sum(t.prompt_tokens for t in self.turns),
            completion_tokens=sum(t.completion_tokens for t in self.turns),
            seconds=time.perf_counter() - self.started,
            config=cfg.to_dict(),
            answered_by=answered_by if self.answer is not None else None,
        )
        Emitter(self.options.on_event, "dialogue", rounds)(
            "done", stop, answer=result.answer, agreed=agreed, rounds=rounds, error=self.error
        )
        return result

    def loop(self) -> tuple[str, bool, int]:
        """Returns (stop reason, agreed, rounds)."""
        cfg, solver, critic = self.d.config, self.d.solver, self.d.critic
        round_ = 1
        if critic is not None:
            self.own = critic.own_solutions(self.critic_question, self.options)
            if critic.verifier is not None:
                self.judgement = Judgement(critic.verifier, solver.backend, self.d.prompts, self.question,
                                           self.options, threshold=cfg.verify_threshold, samples=cfg.samples,
                                           temperature=cfg.sample_temperature, by_numbers=cfg.number_check)
        turn = self.add(solver.solve(self.question, self.options, round=1, budget=self.budget_left()))
        if self.judgement is not None:
            self.judgement.first = turn
        while True:
            if turn.answer is not None:
                self.answer = turn.answer
            failure = self.failed(turn)
            if failure:
                return failure, False, round_
            if self.out_of_budget(turn):
                return "token_budget", False, round_
            key = " ".join(turn.text.split())
            if key in self.solutions:
                if not self.unjudged(turn):
                    return "repeated_reply", False, round_
                self.judgement.doubted = True  # kept after the number check's question: the samples vote
            else:
                self.solutions.append(key)
            if critic is None:
                return "no_critic", False, round_
            if turn.answer is None:
                critique = NO_ANSWER_REASON
            else:
                self.record_own_solutions()
                check = self.add(
                    critic.check(self.critic_question, turn.text, self.options, round=round_,
                                 budget=self.budget_left(), questioned=self.questioned, own=self.own,
                                 judgement=self.judgement, confidence=turn.confidence)
                )
                if check.verdict == AGREE or equivalent(check.answer, turn.answer):
                    return "agreed", True, round_
                if check.model in MODEL_FREE and self.judgement is not None:
                    self.judgement.start()  # doubted: the verifier will likely want the samples; draw them now
                failure = self.failed(check)
                if failure:
                    return failure, False, round_
                if self.out_of_budget(check):
                    return "token_budget", False, round_
                critique = critique_message(check)
            if round_ >= cfg.max_rounds:
                return "max_rounds", False, round_
            round_ += 1
            turn = self.add(solver.revise(critique, self.options, round=round_, budget=self.budget_left()))


def run_dialogue(
    question: str,
    solver: Backend,
    critic: Backend | None = None,
    config: DialogueConfig | None = None,
    *,
    on_event: EventCallback | None = None,
    cancel: threading.Event | None = None,
    prompts: Prompts | None = None,
    sandbox_factory: SandboxFactory | None = None,
) -> DialogueResult:
    """One dialogue on ``question`` (see :class:`Dialogue`)."""
    dialogue = Dialogue(
        solver, critic, config, prompts=prompts, on_event=on_event, sandbox_factory=sandbox_factory
    )
    return dialogue.run(question, cancel=cancel)
