"""Cutting streamed text at stop strings, shared by every backend and by duet's own engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence

TextCallback = Callable[[str], None]


class StreamCutter:
    """Accumulates streamed text and cuts it at the first stop string.

    ``feed(piece)`` forwards safe text to ``on_text``, holding back a tail that could be the start of a
    stop string, and returns True once a stop string has been seen (the caller should stop reading).
    ``finish()`` flushes what was held back. ``text`` never includes the stop string.
    """

    def __init__(self, stop: Sequence[str] = (), on_text: TextCallback | None = None) -> None:
        self.stops = [s for s in stop if s]
        self.on_text = on_text
        self.text = ""
        self.stop_string: str | None = None
        self._sent = 0
        self._hold = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, piece: str) -> bool:
        """Add generated text; return True when a stop string has matched."""
        if self.stop_string is not None or not piece:
            return self.stop_string is not None
        start = max(0, len(self.text) - self._hold)
        self.text += piece
        hits = [(self.text.find(s, start), s) for s in self.stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            index, self.stop_string = min(hits)
            self.text = self.text[:index]
            self._emit(len(self.text))
            return True
        self._emit(len(self.text) - self._hold)
        return False

    def reset(self) -> None:
        """Forget the text so far (it turned out not to be answer text, e.g. reasoning)."""
        self.text, self._sent = "", 0

    def finish(self) -> str:
        """Flush held-back text and return the whole text."""
        self._emit(len(self.text))
        return self.text

    def _emit(self, upto: int) -> None:
        if upto > self._sent:
            if self.on_text is not None:
                self.on_text(self.text[self._sent : upto])
            self._sent = upto
