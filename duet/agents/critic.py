r"""The critic: checks the solver's last solution independently and gives a verdict.

Each check is a fresh conversation ``[system, user(problem + solution)]`` (the critic needs no
history, which keeps it inside a small model's context), run with the same step / code / output
protocol in its own sandbox session. The verdict is read by :func:`duet.agents.protocol.parse_verdict`;
the critic's own ``\boxed{}`` answer (if any) lets the dialogue detect agreement by equivalence.
"""

from __future__ import annotations

from duet.agents.backends import Backend
from duet.agents.events import Emitter
from duet.agents.protocol import DISAGREE, parse_verdict
from duet.agents.transcript import Turn
from duet.agents.turn import TurnOptions, end_turn, run_turn
from duet.prompts import Prompts, load_prompts

GENERIC_DISAGREE = "the answer looks wrong; check every step again."
NO_VERDICT_REASON = "the checker could not confirm the answer; check every step again."
NO_ANSWER_REASON = r"the solution has no final answer in \boxed{}."


class Critic:
    """Checks solutions with one backend."""

    def __init__(self, backend: Backend, prompts: Prompts | None = None) -> None:
        self.backend = backend
        self.prompts = prompts or load_prompts()

    def check(
        self, question: str, solution: str, options: TurnOptions, *, round: int, budget: int | None = None
    ) -> Turn:
        """Critique ``solution`` to ``question``; the turn carries ``verdict``, ``reason`` and ``answer``."""
        messages = [
            {"role": "system", "content": self.prompts.critic_system},
            {"role": "user", "content": self.prompts.critic_request(question, solution)},
        ]
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
