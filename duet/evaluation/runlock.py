"""One process per run directory: an exclusive lock file."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from duet.errors import DuetError


class RunLock:
    """An exclusive ``flock`` on ``<run>/.lock`` (released by the kernel if the process dies)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise DuetError(
                f"another `duet eval` is writing into {self.path.parent}; wait for it or use another --out"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
