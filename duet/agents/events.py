"""Structured events the dialogue emits while it runs (the CLI renders them live; eval logs them).

Every event is ``Event(kind, agent, round, text, data)``; ``agent`` is "solver", "critic" or
"dialogue"; ``round`` counts from 1. The kinds, in the order a turn produces them:

=============  =====================================================================================
``turn_start`` a turn begins. data: ``model``, ``task`` ("solve", "revise", "follow_up", "critique")
``delta``      streamed model text as it is generated (answer text only, never reasoning or outputs)
``step``       the prose of a step, once its piece of text is complete
``code``       a code cell about to run. data: ``step`` (1-based)
``output``     its output block content. data: ``step``, ``ok``, ``error``, ``seconds``, ``state_lost``,
               ``truncated``
``answer``     the turn's final ``\\boxed{}`` answer
``verdict``    critic only: text "agree" / "disagree" / "none". data: ``reason``, ``answer``, ``score`` (the
               verifier's P(correct) of the solution, when it scored it)
``error``      something went wrong, one line (backend error, unterminated block, no answer, ...).
               data: ``reason`` (a stop reason or a short code)
``turn_end``   the turn ended. data: ``finish``, ``prompt_tokens``, ``completion_tokens``, ``seconds``
``done``       the dialogue ended (agent "dialogue"). text: the stop reason. data: ``answer``,
               ``agreed``, ``rounds``
=============  =====================================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

EVENT_KINDS = (
    "turn_start",
    "delta",
    "step",
    "code",
    "output",
    "answer",
    "verdict",
    "error",
    "turn_end",
    "done",
)

log = logging.getLogger("duet.agents")


@dataclass
class Event:
    """One thing that happened in the dialogue."""

    kind: str
    agent: str
    round: int
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for event logs)."""
        return asdict(self)


EventCallback = Callable[[Event], None]


class Emitter:
    """Sends events for one agent and round to a callback; a failing callback is logged, not raised.

    (A renderer bug must not turn into a backend error or stop the dialogue halfway.)
    """

    def __init__(self, callback: EventCallback | None, agent: str, round: int) -> None:
        self.callback, self.agent, self.round = callback, agent, round
        self._failed = False

    def __call__(self, kind: str, text: str = "", **data: Any) -> None:
        """Emit ``Event(kind, agent, round, text, data)``."""
        if self.callback is None:
            return
        try:
            self.callback(Event(kind, self.agent, self.round, text, data))
        except Exception:
            if not self._failed:
                log.exception("on_event callback failed on a %r event; further failures are silent", kind)
            self._failed = True

    def delta(self, text: str) -> None:
        """Streaming callback for backends: emits a ``delta`` event."""
        self("delta", text)
