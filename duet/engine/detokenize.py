"""Streaming text out of token ids: multi-byte safe, and aware of stop strings.

A byte-level tokenizer can split one character over several tokens ("é" is two bytes); decoding
a prefix then ends in U+FFFD. `TextStream` only releases text once it is complete, and holds back
any tail that could still become a stop string, so a streaming callback never shows text that the
final result does not contain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REPLACEMENT = "\ufffd"


@dataclass
class TextStream:
    """Incremental decoder for one completion."""

    tokenizer: object
    stop: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    text: str = ""  # all complete text decoded so far (may run past a stop string until `add` sees it)
    emitted: int = 0  # characters already handed to the stream callback
    stop_string: str | None = None
    # Decode only a recent window of ids: a byte-level decode of ids[prefix:] is text[prefix_chars:]
    _prefix: int = 0
    _prefix_chars: int = 0
    _held: int = 0  # tokens held back waiting for the rest of a character

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
        self.text = self.text[: self._prefix_chars] + window
        # Move the window forward so decoding stays cheap on long generations.
        if len(self.ids) - self._prefix > 64:
            start = len(self.ids) - 8
            tail = self.tokenizer.decode(self.ids[start:], skip_special_tokens=True)
            if not tail.startswith(REPLACEMENT) and self.text.endswith(tail):  # a clean character boundary
                self._prefix, self._prefix_chars = start, len(self.text) - len(tail)
        if self.stop:
            search_from = max(0, self.emitted - max(map(len, self.stop)))
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                cut, self.stop_string = min(hits)
                self.text = self.text[:cut]
                return self._release(len(self.text)), True
        return self._release(len(self.text) - self._held_back()), False

    def finish(self) -> str:
        """Release whatever is left (the completion ended without a stop string)."""
        if self._held:
            self.text = self.text[: self._prefix_chars] + self.tokenizer.decode(
                self.ids[self._prefix:], skip_special_tokens=True)
            self._held = 0
        return self._release(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _release(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out, self.emitted = self.text[self.emitted:upto], upto
        return out
