"""The REPL's conversation state, apart from the terminal: one Dialogue, its exchanges, /regen, switches.

* :meth:`Conversation.ask` runs a question in the current conversation (a follow-up after the first),
  or on its own when :attr:`Conversation.followups` is off (the exchanges are kept for /save either way);
  an interrupted run is undone (the partial response does not stay in the context) but stays
  available to /regen, /copy and the ratings.
* :meth:`Conversation.regen` puts the conversation back to where it was before the last question and
  runs it again with ``seed + 1`` (and ``regen_temperature`` when the temperature is 0, since greedy
  decoding would write the same response again); the new exchange replaces the old one.
* :meth:`Conversation.set_critic` / :meth:`Conversation.set_solver` rebuild the Dialogue, keeping the
  conversation so far.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duet.app.backends import dialogue_config
from duet.app.settings import Settings


@dataclass
class Exchange:
    """One question and its result, with what is needed to regenerate it."""

    question: str
    result: Any  # DialogueResult
    before: tuple[list[dict[str, str]], list[str]]  # solver conversation and questions before it
    seed: int
    temperature: float
    log_id: int | None = None
    regen_of: int | None = None  # log id of the exchange it replaced

    @property
    def response(self) -> str:
        """The solver's last message (what the person read as the response)."""
        turns = [t for t in self.result.turns if t.agent == "solver"]
        return turns[-1].text if turns else ""

    @property
    def interrupted(self) -> bool:
        return self.result.stop_reason == "interrupted"


class Conversation:
    """See the module docstring. ``critic=None`` means the critic uses the solver's backend."""

    def __init__(self, settings: Settings, solver: Any, critic: Any | None = None, *, on_event: Any = None,
                 followups: bool = True) -> None:
        self.settings = settings
        self.solver_backend, self.critic_backend = solver, critic
        self.critic_on = bool(settings.critic)
        self.followups = followups  # off: every question starts afresh (see followups_for)
        self.on_event = on_event
        self.exchanges: list[Exchange] = []  # the conversation, in order (interrupted runs excluded)
        self.last: Exchange | None = None  # the latest exchange, interrupted or not
        self.dialogue = self._dialogue()

    # -- running -------------------------------------------------------------------------------

    def ask(self, question: str, cancel: threading.Event | None = None, *, seed: int | None = None,
            temperature: float | None = None) -> Exchange:
        """Run ``question`` in the conversation; returns the exchange (also kept as :attr:`last`)."""
        seed = self.settings.seed if seed is None else seed
        temperature = self.settings.temperature if temperature is None else temperature
        before = ([dict(m) for m in self.dialogue.solver.conversation], list(self.dialogue.questions))
        if not self.followups:
            self.dialogue.reset()
        self.dialogue.config.seed, self.dialogue.config.temperature = seed, temperature
        result = self.dialogue.run(question, cancel=cancel)
        exchange = Exchange(question, result, before, seed, temperature)
        if exchange.interrupted:
            self._restore(before)
        else:
            self.exchanges.append(exchange)
        self.last = exchange
        return exchange

    def regen(self, cancel: threading.Event | None = None) -> Exchange:
        """Run the last question again from the state before it, with a new seed (see the module docstring)."""
        last = self.last
        if last is None:
            raise LookupError("nothing to regenerate yet")
        self._restore(last.before)
        if last in self.exchanges:
            self.exchanges.remove(last)
        temperature = last.temperature or self.settings.regen_temperature
        exchange = self.ask(last.question, cancel, seed=last.seed + 1, temperature=temperature)
        exchange.regen_of = last.log_id
        return exchange

    # -- switches ------------------------------------------------------------------------------

    def set_critic(self, on: bool) -> None:
        """Turn the critic on or off for the next questions."""
        self.critic_on = on
        self._rebuild()

    def set_solver(self, backend: Any, critic: Any | None = None) -> None:
        """Use another solver backend (and critic backend; None: the solver's) from the next question on."""
        self.solver_backend, self.critic_backend = backend, critic
        self._rebuild()

    def clear(self) -> None:
        """Start a new conversation."""
        self.dialogue.reset()
        self.exchanges = []
        self.last = None

    @property
    def solver_name(self) -> str:
        return str(getattr(self.solver_backend, "name", self.solver_backend))

    @property
    def critic_name(self) -> str:
        return str(getattr(self.critic_backend or self.solver_backend, "name", ""))

    # -- internals -----------------------------------------------------------------------------

    def _dialogue(self) -> Any:
        from duet.agents.dialogue import Dialogue

        config = dialogue_config(self.settings, critic=self.critic_on)
        return Dialogue(self.solver_backend, self.critic_backend, config, on_event=self.on_event)

    def _rebuild(self) -> None:
        old = self.dialogue
        self.dialogue = self._dialogue()
        self.dialogue.solver.conversation = old.solver.conversation
        self.dialogue.questions = old.questions

    def _restore(self, state: tuple[list[dict[str, str]], list[str]]) -> None:
        conversation, questions = state
        self.dialogue.solver.conversation = [dict(m) for m in conversation]
        self.dialogue.questions = list(questions)


def followups_for(settings: Settings, spec: str) -> bool:
    """Whether questions follow up on earlier ones with the solver backend ``spec``: the ``followups`` setting
    when set anywhere; unset, on, except for the embedded model. It was trained on single problems and, asked
    a follow-up, solves the first problem again (and its critic agrees)."""
    if settings.sources.get("followups", "default") != "default":
        return bool(settings.followups)
    if not spec.startswith("local:"):
        return True
    from duet.model.embedded import EMBEDDED_DIR, default_model_path

    path = Path(spec.removeprefix("local:")).expanduser() if spec != "local:" else default_model_path()
    return path.resolve() != EMBEDDED_DIR.resolve()
