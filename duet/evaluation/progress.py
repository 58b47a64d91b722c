"""The live progress bar of an evaluation run: problems done and accuracy per mode."""

from __future__ import annotations

import time
from typing import Any

from duet.evaluation.modes import Mode
from duet.evaluation.run_types import Say


class Progress:
    """Progress display: a rich bar per mode on a terminal, else a line every ~10% (or 30 s)."""

    def __init__(self, modes: list[Mode], totals: dict[str, int], done: dict[str, list[bool]], *,
                 live: bool, say: Say, console: Any = None) -> None:
        self.totals, self.correct = totals, {m: sum(v) for m, v in done.items()}
        self.count = {m: len(v) for m, v in done.items()}
        self.say, self.live = say, live
        self.started = time.monotonic()
        self.start_count = dict(self.count)
        self.last_line = 0.0
        self.bar = None
        if live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("acc {task.fields[acc]}"), TextColumn("ETA"), TimeRemainingColumn(),
                                TimeElapsedColumn(), console=console, transient=False)
            self.tasks = {m.name: self.bar.add_task(m.name, total=totals[m.name], completed=self.count[m.name],
                                                    acc=self._acc(m.name)) for m in modes}

    def _acc(self, mode: str) -> str:
        n = self.count[mode]
        return f"{self.correct[mode] / n:.3f}" if n else "-"

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def advance(self, mode: str, correct: bool) -> None:
        self.count[mode] += 1
        self.correct[mode] += bool(correct)
        if self.bar is not None:
            self.bar.update(self.tasks[mode], advance=1, acc=self._acc(mode))
            return
        total = self.totals[mode]
        step = max(1, total // 10)
        now = time.monotonic()
        if self.count[mode] % step == 0 or self.count[mode] == total or now - self.last_line > 30:
            self.last_line = now
            new = sum(self.count.values()) - sum(self.start_count.values())
            left = sum(self.totals.values()) - sum(self.count.values())
            eta = (now - self.started) / new * left if new else 0.0
            self.say(f"[{mode}] {self.count[mode]}/{total} done, accuracy {self._acc(mode)}, ETA {eta:.0f} s")
