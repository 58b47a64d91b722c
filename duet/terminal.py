"""Untrusted text made safe for a terminal: one function for everything duet prints.

A model's text, the output of the code it ran, a server's reply and text read back from the logs
can hold escape sequences that set the clipboard (OSC 52), the window title, clear the screen,
or move the cursor to rewrite what was shown. :func:`safe_text` makes every C0 control character
but newline and tab, DEL and every C1 control character visible instead (``^[``, ``^G``,
``\\x9b``), so no escape sequence from such text reaches a terminal. :class:`SafeConsole` is a rich
Console that applies it to all the text it prints (its own styling codes are not text and stay).
Saved transcripts and the logs keep the raw text; only what is printed is changed.
"""

from __future__ import annotations

import re
from typing import Any

_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _visible(match: re.Match) -> str:
    code = ord(match.group())
    if code < 0x20:
        return "^" + chr(code + 0x40)  # ESC -> ^[, BEL -> ^G, CR -> ^M
    if code == 0x7F:
        return "^?"
    return f"\\x{code:02x}"  # C1 (0x80-0x9f): CSI, OSC, ... in their single-character forms


def safe_text(text: object) -> str:
    """`text` as a str with every control character except newline and tab made visible."""
    text = text if isinstance(text, str) else str(text)
    return _UNSAFE.sub(_visible, text)


def _safe_console_class() -> type:
    from rich.console import Console  # imported on first use: the CLI starts without rich
    from rich.segment import Segment

    class SafeConsole(Console):
        """A rich Console that passes all printed text through :func:`safe_text` (live views included)."""

        def _render_buffer(self, buffer) -> str:  # noqa: ANN001 - rich's own signature
            return super()._render_buffer(
                segment if segment.control else Segment(safe_text(segment.text), segment.style, segment.control)
                for segment in buffer
            )

    return SafeConsole


_classes: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name == "SafeConsole":
        if name not in _classes:
            _classes[name] = _safe_console_class()
        return _classes[name]
    raise AttributeError(name)
