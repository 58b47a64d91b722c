"""What one sandbox run gives back: `RunResult`, and `OutputCollector`, which gathers one output stream of a run."""

from __future__ import annotations

import codecs
import dataclasses


@dataclasses.dataclass
class RunResult:
    """The outcome of one Sandbox.run.

    ok is True when the code ran to the end without raising (and its session survived). error is
    None or one line: the exception's last line ("ZeroDivisionError: division by zero"), "timed
    out after 5 s", "memory limit 1024 MB exceeded", "session crashed: SIGSEGV (...)", or, when
    the code succeeded but printed too much, "output truncated at 64 KB" (then ok stays True and
    truncated is True). seconds is the wall time of the run itself, session start excluded.
    state_lost is True on the first run of a fresh session that replaced one that died.
    """

    stdout: str
    stderr: str
    error: str | None
    ok: bool
    seconds: float
    state_lost: bool = False
    truncated: bool = False


class OutputCollector:
    """One output stream of one run: keeps the first `limit` bytes and counts the rest.

    No end marker is needed: the relay reports a run only after every process of the session is
    stopped, so once the reply is in, what the pipe holds is all of the run's output.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = bytearray()
        self.total = 0
        self.eof = False

    def feed(self, data: bytes) -> None:
        self._keep(data)

    def _keep(self, data: bytes) -> None:
        self.total += len(data)
        room = self.limit - len(self.kept)
        if room > 0:
            self.kept += data[:room]

    @property
    def truncated(self) -> bool:
        return self.total > self.limit

    def text(self) -> str:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        return decoder.decode(bytes(self.kept), final=not self.truncated)  # don't show a cut character
