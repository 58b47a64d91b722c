"""The options of an evaluation run, what it decided before starting, and what it did."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duet.agents.dialogue import DialogueConfig
from duet.evaluation.datasets import Dataset, Fields, Problem
from duet.evaluation.modes import Context, Mode


@dataclass
class EvalOptions:
    """Every option of ``duet eval run`` (the CLI fills one; tests may build one directly)."""

    data: Path
    out: Path | None = None
    backend: str = "local:"
    critic_backend: str | None = None
    modes: str = "solver+critic"
    fields: Fields = field(default_factory=Fields)
    format: str | None = None
    limit: int | None = None
    shuffle: bool = False
    seed: int = 0
    shard: str | None = None
    strict: bool = False
    concurrency: int | None = None
    dialogue: DialogueConfig = field(default_factory=DialogueConfig)
    sc_temperature: float = 0.7
    backend_options: dict[str, Any] = field(default_factory=dict)  # make_backend options of the solver
    critic_options: dict[str, Any] | None = None  # ... of the critic (None: the solver's)
    retry_errors: bool = False


@dataclass
class Outcome:
    """What an invocation did."""

    run_dir: Path
    selected: int = 0
    skipped_done: int = 0
    completed: int = 0
    interrupted: bool = False
    aborted: str | None = None  # the error that stopped the run early (every result so far failed)
    summary: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)


Say = Callable[[str], None]



@dataclass
class Prepared:
    """Everything decided before the first dialogue starts."""

    options: EvalOptions
    data: Dataset
    problems: list[Problem]
    modes: list[Mode]
    run_dir: Path
    config: dict[str, Any]
    context: Context
    concurrency: int
    solver_options: dict[str, Any] = field(default_factory=dict)
    critic_options: dict[str, Any] | None = None
