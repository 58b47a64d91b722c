"""Streaming text out of token ids: multi-byte safe, and cut at stop strings.

A byte-level tokenizer can split one character over several tokens ("é" is two bytes); decoding
a prefix then ends in U+FFFD. `TextStream` only passes on text once it is complete, and hands it to
a `StreamCutter` that holds back any tail that could still become a stop string, so a streaming
callback never shows text that the final result does not contain.
"""

from __future__ import annotations

from duet.stops import StreamCutter

REPLACEMENT = "\ufffd"


class TextStream:
    """Incremental decoder for one completion."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._released: list[str] = []
        self.cutter = StreamCutter(stop or [], self._released.append)
        self._decoded = ""  # complete text decoded so far, before stop-string cutting
        # Decode only a recent window of ids: the decode of ids[prefix:] is _decoded[prefix_chars:].
        self._prefix = 0
        self._prefix_chars = 0
        self._held = 0  # tokens held back waiting for the rest of a character

    @property
    def text(self) -> str:
        """The completion's text, cut before a stop string once one was seen."""
        return self.cutter.text

    @property
    def stop_string(self) -> str | None:
        return self.cutter.stop_string

    def add(self, token_ids: list[int]) -> tuple[str, bool]:
        """Append tokens; return (newly released text, whether a stop string was reached)."""
        self.ids.extend(token_ids)
        window = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        # A character is at most 4 bytes: wait that long for it to complete, then accept U+FFFD
        # (the model really produced an invalid byte sequence).
        if window.endswith(REPLACEMENT) and self._held < 3:
            self._held += 1
            return "", False
        self._held = 0
        decoded = self._decoded[: self._prefix_chars] + window
        stopped = self.cutter.feed(decoded[len(self._decoded):])
        self._decoded = decoded
        self._slide_window()
        return self._take(), stopped

    def finish(self) -> str:
        """Release whatever is left (the completion ended without a stop string)."""
        if self._held and self.cutter.stop_string is None:
            window = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
            self.cutter.feed((self._decoded[: self._prefix_chars] + window)[len(self._decoded):])
        self.cutter.finish()
        return self._take()

    def _slide_window(self) -> None:
        """Move the decode window forward so decoding stays cheap on long generations."""
        if len(self.ids) - self._prefix <= 64:
            return
        start = len(self.ids) - 8
        tail = self.tokenizer.decode(self.ids[start:], skip_special_tokens=True)
        if not tail.startswith(REPLACEMENT) and self._decoded.endswith(tail):  # a clean character boundary
            self._prefix, self._prefix_chars = start, len(self._decoded) - len(tail)

    def _take(self) -> str:
        out = "".join(self._released)
        self._released.clear()
        return out
