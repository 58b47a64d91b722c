"""What a dialogue leaves behind: steps, turns and the result, serialised to versioned JSON.

``DialogueResult.to_json()`` writes ``{"version": 1, ...}``; ``from_json`` reads it back (and
refuses other versions with a clear ValueError). Fields are plain data so eval logs can be read
without duet.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

TRANSCRIPT_VERSION = 1


@dataclass
class Step:
    """One code cell of a turn: the prose before it, the code, and the output block duet wrote."""

    text: str
    code: str
    output: str
    ok: bool = True
    error: str | None = None
    seconds: float = 0.0
    state_lost: bool = False
    truncated: bool = False


@dataclass
class Turn:
    """One agent turn: the request messages, the assistant message it wrote, and what it means.

    ``finish`` is why the turn ended: "eos" (the model ended it), "length" (max_tokens for the turn),
    "token_budget", "max_steps", "interrupted", "context_full" (the conversation no longer fits the
    model's context), "backend_error" or "sandbox_error".
    """

    agent: str  # "solver" | "critic"
    round: int
    # "solve" | "revise" | "follow_up" | "critique" | "own_solution" (the critic solving the problem itself) |
    # "number_check" / "own_solutions" (the critic's model-free checks) | "verify" (the critic's verifier
    # score, and the vote among sampled solutions when it is low) | "sample" (a sampled alternative solution)
    task: str
    model: str
    messages: list[dict[str, str]]  # the conversation sent to the model, before this reply
    text: str = ""  # the whole assistant message: steps, code blocks, output blocks, answer
    reasoning: str = ""  # a reasoning model's thinking, kept apart from text
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None
    verdict: str | None = None  # critic: "agree" | "disagree" | "none"
    reason: str | None = None  # critic: the reason of its verdict (one line; own_solutions adds its solution)
    score: dict[str, Any] | None = None  # verify/sample: the verifier's {"p": P(correct), "method": ...}
    votes: list[dict[str, Any]] | None = None  # verify: the weighted vote, [{"answer", "weight", "count"}, ...]
    # the log-probabilities the model gave the tokens it wrote: {"mean", "min", "tokens"} (None when the backend
    # gives none); the verifier's confidence head reads them
    confidence: dict[str, float] | None = None
    finish: str = "eos"
    error: str | None = None  # one line when the turn failed or was cut short
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Turn:
        """Rebuild a turn from ``asdict`` output."""
        data = dict(data)
        data["steps"] = [Step(**s) for s in data.get("steps", [])]
        return cls(**_known(cls, data))


@dataclass
class DialogueResult:
    """The outcome of a dialogue.

    ``answer`` is the agreed answer; when they never agree, the verifier's vote when the solver's samples
    were drawn, else the solver's last answer (the latest solver turn that gave one), or None;
    ``answered_by`` says which: "agreed", "vote", "solver" (None without an answer). ``rounds`` counts solver
    turns. ``stop_reason`` is one of :data:`duet.agents.dialogue.STOP_REASONS`; ``error`` is a one-line message
    when it is an error.
    """

    question: str
    answer: str | None
    agreed: bool
    rounds: int
    stop_reason: str
    turns: list[Turn] = field(default_factory=list)
    error: str | None = None
    solver_model: str = ""
    critic_model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    answered_by: str | None = None

    @property
    def solver_turns(self) -> list[Turn]:
        """The solver's turns, in order."""
        return [t for t in self.turns if t.agent == "solver"]

    @property
    def critic_turns(self) -> list[Turn]:
        """The critic's turns, in order."""
        return [t for t in self.turns if t.agent == "critic"]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with ``"version": 1`` first."""
        return {"version": TRANSCRIPT_VERSION, **asdict(self)}

    def to_json(self, indent: int | None = 2) -> str:
        """Serialise to versioned JSON."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DialogueResult:
        """Rebuild a result from :meth:`to_dict` output; raises ValueError on another version."""
        version = data.get("version")
        if version != TRANSCRIPT_VERSION:
            raise ValueError(f"unsupported transcript version {version!r} (duet reads {TRANSCRIPT_VERSION})")
        data = dict(data)
        data["turns"] = [Turn.from_dict(t) for t in data.get("turns", [])]
        return cls(**_known(cls, data))

    @classmethod
    def from_json(cls, text: str) -> DialogueResult:
        """Parse :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Keep the keys ``cls`` knows (so newer files with extra fields still load)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}
