r"""The critic: checks the solver's last solution independently and gives a verdict.

Each check is a fresh conversation ``[system, user(problem + solution)]`` (the critic needs no
history, which keeps it inside a small model's context), run with the same step / code / output
protocol in its own sandbox session. The verdict is read by :func:`duet.agents.protocol.parse_verdict`;
the critic's own ``\boxed{}`` answer (if any) lets the dialogue detect agreement by equivalence.

Before the model is asked, the *number check* (:mod:`duet.agents.grounding`, on unless
``number_check=False``) looks for numbers in the solution's code that the problem does not give, or
that it gives once and the code uses on both sides of ``-`` or ``/``. When it finds some, the check
is a model-free turn (``task="number_check"``, model ``duet:number-check``) that disagrees and says
what it found (with the problem's closest number for one it does not give). A checker built from
the same model as the solver tends to miscopy the same way, so these are slips it cannot catch itself.
A number is questioned once per dialogue (``questioned``): a revision that keeps it (the solver may
have a reason, e.g. an intermediate result written out) goes to the model's check.
"""

from __future__ import annotations

from duet.agents.backends import Backend
from duet.agents.events import Emitter
from duet.agents.grounding import check_numbers, number_check_reason
from duet.agents.protocol import DISAGREE, Verdict, parse_verdict
from duet.agents.transcript import Turn
from duet.agents.turn import TurnOptions, end_turn, run_turn
from duet.prompts import Prompts, load_prompts

GENERIC_DISAGREE = "the answer looks wrong; check every step again."
NO_VERDICT_REASON = "the checker could not confirm the answer; check every step again."
NO_ANSWER_REASON = r"the solution has no final answer in \boxed{}."
NUMBER_CHECK_MODEL = "duet:number-check"


class Critic:
    """Checks solutions with one backend."""

    def __init__(self, backend: Backend, prompts: Prompts | None = None, *, number_check: bool = True) -> None:
        self.backend = backend
        self.prompts = prompts or load_prompts()
        self.number_check = number_check

    def check(
        self, question: str, solution: str, options: TurnOptions, *, round: int, budget: int | None = None,
        questioned: set[str] | None = None,
    ) -> Turn:
        """Critique ``solution`` to ``question``; the turn carries ``verdict``, ``reason`` and ``answer``.

        ``questioned``: numbers the number check already questioned in this dialogue (not questioned
        again); the ones this check questions are added to it.
        """
        messages = [
            {"role": "system", "content": self.prompts.critic_system},
            {"role": "user", "content": self.prompts.critic_request(question, solution)},
        ]
        questioned = set() if questioned is None else questioned
        findings = [f for f in (check_numbers(question, solution) if self.number_check else [])
                    if f.key not in questioned]
        if findings:
            questioned.update(f.key for f in findings)
            reason = number_check_reason(findings)
            turn = Turn("critic", round, "number_check", NUMBER_CHECK_MODEL, messages,
                        text=f"Check the numbers against the problem.\nVERDICT: DISAGREE: {reason}")
            Emitter(options.on_event, "critic", round)("turn_start", model=turn.model, task=turn.task)
            verdict = Verdict(DISAGREE, reason)
        else:
            turn = run_turn(self.backend, messages, options, agent="critic", round=round, task="critique",
                            budget=budget)
            verdict = parse_verdict(turn.text)
        turn.verdict, turn.reason = verdict.kind, verdict.reason
        if turn.error is None or turn.text:
            Emitter(options.on_event, "critic", round)(
                "verdict", verdict.kind, reason=verdict.reason, answer=turn.answer
            )
        end_turn(turn, options)
        return turn


def critique_message(turn: Turn) -> str:
    """The critique given to the solver: the critic's reason (or a generic one), plus its own answer."""
    if turn.verdict == DISAGREE:
        reason = turn.reason or GENERIC_DISAGREE
    else:
        reason = NO_VERDICT_REASON
    if turn.answer:
        reason = f"{reason.rstrip()} (the checker's answer: {turn.answer})"
    return reason
