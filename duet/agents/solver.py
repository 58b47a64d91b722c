r"""The solver: tool-integrated reasoning over one reusable conversation.

The conversation is ``[system, user(question), assistant(solution), user(revise), assistant, ...]``.
:meth:`Solver.solve` starts it (or, when it already exists, appends the question as a follow-up);
:meth:`Solver.revise` appends the critique and asks for a new full solution. Each reply is one
assistant message written by :func:`duet.agents.turn.run_turn` (steps, code and output blocks, and a
final ``\boxed{}`` answer). A turn that failed before writing anything leaves no dangling user
message, so the conversation stays usable for the next question.
"""

from __future__ import annotations

from duet.agents.backends import Backend, Message
from duet.agents.events import Emitter
from duet.agents.transcript import Turn
from duet.agents.turn import TurnOptions, end_turn, run_turn
from duet.prompts import Prompts, load_prompts


class Solver:
    """Solves a question with one backend, and revises after critiques."""

    def __init__(self, backend: Backend, prompts: Prompts | None = None) -> None:
        self.backend = backend
        self.prompts = prompts or load_prompts()
        self.conversation: list[Message] = []

    def reset(self) -> None:
        """Forget the conversation (the next :meth:`solve` starts a new one)."""
        self.conversation = []

    def solve(
        self, question: str, options: TurnOptions, *, round: int = 1, budget: int | None = None
    ) -> Turn:
        """Answer ``question``: a new conversation, or a follow-up in the current one."""
        task = "follow_up" if self.conversation else "solve"
        if not self.conversation:
            self.conversation.append({"role": "system", "content": self.prompts.solver_system})
        return self._turn(self.prompts.solver_question(question), options, round, task, budget)

    def revise(self, critique: str, options: TurnOptions, *, round: int, budget: int | None = None) -> Turn:
        """Write a new full solution after ``critique`` (one line of reasons)."""
        return self._turn(self.prompts.revise_request(critique), options, round, "revise", budget)

    def _turn(self, user: str, options: TurnOptions, round: int, task: str, budget: int | None) -> Turn:
        self.conversation.append({"role": "user", "content": user})
        turn = run_turn(self.backend, self.conversation, options, agent="solver", round=round, task=task,
                        budget=budget)
        if turn.text:
            self.conversation.append({"role": "assistant", "content": turn.text})
        else:
            self.conversation.pop()
        emit = Emitter(options.on_event, "solver", round)
        if turn.answer is not None:
            emit("answer", turn.answer)
        elif turn.finish in ("eos", "length", "max_steps", "token_budget"):
            emit("error", r"no final answer in \boxed{}", reason="no_answer")
        end_turn(turn, options)
        return turn
