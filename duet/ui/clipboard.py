"""Copying text for /copy: OSC 52 to the terminal, a clipboard command, or a file; and saying which.

``mode="auto"`` picks, in order:

1. OSC 52 (``ESC ] 52 ; c ; <base64> BEL`` written to the terminal) when the terminal is known to accept
   it (kitty, WezTerm, iTerm2, Ghostty, Alacritty, foot, Windows Terminal, VS Code) or the session is
   over SSH in such a terminal: it reaches the clipboard of the machine the person sits at;
2. a clipboard command on this machine when not over SSH: ``pbcopy``, ``wl-copy`` (Wayland),
   ``xclip`` / ``xsel`` (X11), ``clip.exe`` (WSL);
3. else the fallback file (``$XDG_DATA_HOME/duet/clipboard.txt``).

``mode="osc52"``, ``"command"`` or ``"file"`` forces one way (``clipboard`` in the config file).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

OSC52_LIMIT = 100_000  # base64 bytes; many terminals drop longer sequences
OSC52_TERM_PROGRAMS = ("iTerm.app", "WezTerm", "vscode", "ghostty", "kitty", "Tabby", "rio")
OSC52_TERMS = ("xterm-kitty", "alacritty", "foot", "wezterm", "xterm-ghostty", "contour", "rio")
OSC52_ENV_HINTS = ("KITTY_WINDOW_ID", "WEZTERM_PANE", "WT_SESSION", "GHOSTTY_RESOURCES_DIR", "ALACRITTY_SOCKET")


@dataclass
class Copied:
    """How the text was copied: ``method`` is "osc52", "command" or "file"; ``detail`` says more."""

    method: str
    detail: str

    def describe(self, what: str) -> str:
        """A sentence for the person, e.g. "copied the answer to the clipboard via OSC 52"."""
        if self.method == "osc52":
            return f"copied {what} to the clipboard via OSC 52 ({self.detail})"
        if self.method == "command":
            return f"copied {what} to the clipboard via {self.detail}"
        return f"no clipboard reachable here: wrote {what} to {self.detail}"


def osc52_supported(env: Mapping[str, str]) -> bool:
    """Whether the terminal is known to accept OSC 52 clipboard writes."""
    term = env.get("TERM", "")
    if env.get("TERM_PROGRAM", "") in OSC52_TERM_PROGRAMS:
        return True
    if any(term.startswith(t) for t in OSC52_TERMS):
        return True
    return any(env.get(name) for name in OSC52_ENV_HINTS)


def clipboard_command(env: Mapping[str, str]) -> list[str] | None:
    """A clipboard command that works on this machine's desktop, or None (none, or over SSH)."""
    if env.get("SSH_TTY") or env.get("SSH_CONNECTION"):
        return None
    candidates: list[list[str]] = []
    if shutil.which("pbcopy"):
        candidates.append(["pbcopy"])
    if env.get("WAYLAND_DISPLAY"):
        candidates.append(["wl-copy"])
    if env.get("DISPLAY"):
        candidates += [["xclip", "-selection", "clipboard"], ["xsel", "--clipboard", "--input"]]
    candidates.append(["clip.exe"])
    for argv in candidates:
        if shutil.which(argv[0]):
            return argv
    return None


def osc52_sequence(text: str, env: Mapping[str, str]) -> str:
    """The escape sequence (wrapped for tmux's passthrough inside tmux)."""
    payload = base64.b64encode(text.encode("utf-8")).decode("ascii")
    sequence = f"\x1b]52;c;{payload}\x07"
    if env.get("TMUX"):
        sequence = "\x1bPtmux;" + sequence.replace("\x1b", "\x1b\x1b") + "\x1b\\"
    return sequence


def copy_text(text: str, *, mode: str = "auto", fallback: Path, terminal: IO[str] | None = None,
              env: Mapping[str, str] | None = None) -> Copied:
    """Copy ``text`` (see the module docstring); ``terminal`` is where OSC 52 is written (a TTY)."""
    env = os.environ if env is None else env
    is_tty = terminal is not None and _isatty(terminal)
    fits = len(text.encode("utf-8")) * 4 // 3 < OSC52_LIMIT
    if mode == "osc52" or (mode == "auto" and is_tty and fits and osc52_supported(env)):
        if terminal is not None and fits:
            terminal.write(osc52_sequence(text, env))
            terminal.flush()
            name = env.get("TERM_PROGRAM") or env.get("TERM") or "terminal"
            return Copied("osc52", f"terminal: {name}")
    if mode in ("auto", "command"):
        argv = clipboard_command(env)
        if argv is not None:
            try:
                subprocess.run(argv, input=text.encode("utf-8"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=5, check=True)
                return Copied("command", argv[0])
            except (OSError, subprocess.SubprocessError):
                pass
    fallback.parent.mkdir(parents=True, exist_ok=True)
    fallback.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return Copied("file", str(fallback))


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
