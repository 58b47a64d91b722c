"""Drawing a dialogue while it runs, from its events (``duet.agents.events``).

* :class:`RichRenderer` (a terminal): a header per turn, the model's text streaming live under a
  spinner, then each step as it completes: its prose, the code highlighted, the output dimmed in a
  panel (red when the code failed), the critic's verdict coloured, and :meth:`final` draws the
  answer panel (answer, agreed, rounds, stop reason, tokens, seconds).
* :class:`PlainRenderer` (a pipe or a file): the same as plain text, no ANSI codes; the streamed text
  plus the output blocks is exactly the transcript's text.
* :class:`ProgressRenderer` (``--json`` / ``--quiet`` on a terminal): one spinner line on stderr.

Failures that end the dialogue (backend, sandbox, interrupted) are not drawn as events: the command
reports them once, at the end.
"""

from __future__ import annotations

import re
import threading
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.rule import Rule
from rich.spinner import Spinner
from rich.syntax import Syntax
from rich.text import Text

from duet.terminal import safe_text

AGENT_STYLE = {"solver": "cyan", "critic": "magenta"}
TASK_LABEL = {"solve": "solving", "revise": "revising", "follow_up": "follow-up", "critique": "checking",
              "number_check": "checking the numbers", "own_solutions": "comparing with its own solutions",
              "own_solution": "solving it itself", "verify": "judging the answer"}
SILENT_ERRORS = ("backend_error", "sandbox_error", "interrupted")
BOXED = re.compile(r"\\boxed\{(?:[^{}]|\{[^{}]*\})*\}")


def summary_line(result: Any, critic: bool = True) -> str:
    """``agreed: yes · 1 round · stop: agreed · 230 tokens · 1.4 s`` (generated tokens) for a DialogueResult."""
    if not critic or result.critic_model is None:
        agreed = "critic: off"
    else:
        agreed = "agreed: " + ("yes" if result.agreed else "no")
        if result.answered_by == "vote":
            agreed += " · answer: the samples' vote"
    rounds = f"{result.rounds} round" + ("" if result.rounds == 1 else "s")
    tokens = f"{result.completion_tokens} tokens"
    return f"{agreed} · {rounds} · stop: {result.stop_reason} · {tokens} · {result.seconds:.1f} s"


class RichRenderer:
    """Renders events on a terminal with rich (see the module docstring)."""

    def __init__(self, console: Console, *, refresh_per_second: float = 10.0) -> None:
        self.console = console
        self.refresh = refresh_per_second
        self.buffer = ""  # streamed text not yet drawn as a step
        self.live: Live | None = None
        self.spinner = Spinner("dots", text="", style="cyan")
        self.lock = threading.RLock()
        self.agent = "solver"

    # -- events ------------------------------------------------------------------------------

    def __call__(self, event: Any) -> None:
        handler = getattr(self, "on_" + event.kind, None)
        if handler is not None:
            with self.lock:
                handler(event)

    def on_turn_start(self, e: Any) -> None:
        self._stop_live()
        self.agent = e.agent
        style = AGENT_STYLE.get(e.agent, "white")
        task = TASK_LABEL.get(e.data.get("task", ""), e.data.get("task", ""))
        title = Text.assemble((e.agent, f"bold {style}"), (f" · round {e.round} · {task}", style))
        self.console.print(Rule(title, align="left", style=style))
        self.buffer = ""
        self._start_live(f"{e.agent} is thinking")

    def on_delta(self, e: Any) -> None:
        self.buffer += e.text
        self.spinner.update(text=Text(f"{self.agent} is writing", style="dim"))

    def on_step(self, e: Any) -> None:
        self.buffer = ""
        self.console.print(self._prose(e.text))

    def on_code(self, e: Any) -> None:
        self.buffer = ""
        code = Syntax(e.text, "python", theme="ansi_dark", background_color="default", word_wrap=True)
        self.console.print(Panel(code, title=f"step {e.data.get('step', '')} · python", title_align="left",
                                 border_style="blue", expand=True))
        self.spinner.update(text=Text(f"running step {e.data.get('step', '')}", style="dim"))

    def on_output(self, e: Any) -> None:
        ok = e.data.get("ok", True)
        seconds = e.data.get("seconds")
        title = "output" + (f" · {seconds:.2f} s" if isinstance(seconds, (int, float)) else "")
        self.console.print(Panel(Text(e.text, style="dim" if ok else "red"), title=title, title_align="left",
                                 border_style="dim" if ok else "red", expand=True))
        self.spinner.update(text=Text(f"{self.agent} is thinking", style="dim"))

    def on_answer(self, e: Any) -> None:
        self.console.print(Text.assemble(("answer ", "dim"), (e.text, "bold")))

    def on_verdict(self, e: Any) -> None:
        reason = e.data.get("reason") or ""
        score = e.data.get("score")
        scored = f" (P(correct) {score:.2f})" if isinstance(score, (int, float)) else ""
        if e.text == "agree":
            line = Text(f"✔ the critic agrees{scored}", style="bold green")
        elif e.text == "disagree":
            line = Text.assemble(("✘ the critic disagrees", "bold red"), (f": {reason}" if reason else "", "red"))
        else:
            line = Text("? the critic gave no verdict", style="yellow")
        self.console.print(line)

    def on_error(self, e: Any) -> None:
        if e.data.get("reason") in SILENT_ERRORS:
            return
        self.console.print(Text(f"! {e.text}", style="yellow"))

    def on_turn_end(self, e: Any) -> None:
        self._stop_live()
        if self.buffer.strip():  # text that never became a step (a failed or cut-off turn)
            self.console.print(Text(self.buffer.strip(), style="dim"))
        self.buffer = ""
        finish = e.data.get("finish")
        if finish not in ("eos", None, *SILENT_ERRORS):
            self.console.print(Text(f"(turn ended: {finish})", style="dim"))

    def on_done(self, e: Any) -> None:
        self._stop_live()

    # -- the end -----------------------------------------------------------------------------

    def final(self, result: Any, critic: bool = True) -> None:
        """The answer panel (nothing for a failed or interrupted dialogue: the caller says what happened)."""
        self.close()
        if result.stop_reason in SILENT_ERRORS:
            return
        if result.answer is not None:
            body = Text(result.answer, style="bold")
        else:
            body = Text("(no answer)", style="bold yellow")
        if result.agreed or (result.critic_model is None and result.answer is not None):
            border = "green"
        else:
            border = "yellow"
        summary = summary_line(result, critic)
        fits = len(summary) + 6 <= self.console.width  # a panel's subtitle is cut, not wrapped: else it goes below
        self.console.print(Panel(body, title="answer", title_align="left", subtitle=summary if fits else None,
                                 subtitle_align="left", border_style=border, expand=True))
        if not fits:
            self.console.print(Text(summary, style="dim"))

    def close(self) -> None:
        """Stop the live area (safe to call twice)."""
        with self.lock:
            self._stop_live()

    def note(self, message: str, style: str = "dim") -> None:
        """A line above the live area (e.g. "stopping ..."), after the text streamed so far."""
        with self.lock:
            if self.buffer.strip():  # written before the note: shown first, not after it at the turn's end
                self.console.print(Text(self.buffer.strip(), style="dim"))
                self.buffer = ""
            self.console.print(Text(message, style=style))

    # -- internals ---------------------------------------------------------------------------

    def _prose(self, text: str) -> Text:
        out = Text(text)
        for match in BOXED.finditer(text):
            out.stylize("bold green", match.start(), match.end())
        return out

    def _view(self) -> RenderableType:
        lines = self.buffer.splitlines()[-max(3, self.console.height - 8):]
        parts: list[RenderableType] = []
        if lines:
            parts.append(Text("\n".join(lines), style="dim"))
        parts.append(self.spinner)
        return Group(*parts)

    def _start_live(self, status: str) -> None:
        self.spinner.update(text=Text(status, style="dim"))
        self.live = Live(get_renderable=self._view, console=self.console, refresh_per_second=self.refresh,
                         transient=True, redirect_stdout=False, redirect_stderr=False)
        self.live.start()

    def _stop_live(self) -> None:
        if self.live is not None:
            live, self.live = self.live, None
            live.stop()


class PlainRenderer:
    """Renders events as plain text on a stream (see the module docstring)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.at_line_start = True
        self.lock = threading.RLock()

    def __call__(self, event: Any) -> None:
        handler = getattr(self, "on_" + event.kind, None)
        if handler is not None:
            with self.lock:
                handler(event)
                self.stream.flush()

    def write(self, text: str) -> None:
        if text:
            self.stream.write(safe_text(text))  # model and sandbox text: no escape sequences
            self.at_line_start = text.endswith("\n")

    def line(self, text: str) -> None:
        """Write ``text`` on a line of its own."""
        if not self.at_line_start:
            self.write("\n")
        self.write(text + "\n")

    def on_turn_start(self, e: Any) -> None:
        task = TASK_LABEL.get(e.data.get("task", ""), e.data.get("task", ""))
        self.line(f"--- {e.agent} · round {e.round} · {task} ---")

    def on_delta(self, e: Any) -> None:
        self.write(e.text)

    def on_output(self, e: Any) -> None:
        self.line(f"```output\n{e.text}\n```")

    def on_verdict(self, e: Any) -> None:
        reason = e.data.get("reason")
        score = e.data.get("score")
        scored = f" (P(correct) {score:.2f})" if isinstance(score, (int, float)) else ""
        self.line(f"verdict: {e.text}{scored}" + (f": {reason}" if reason and e.text == "disagree" else ""))

    def on_error(self, e: Any) -> None:
        if e.data.get("reason") not in SILENT_ERRORS:
            self.line(f"! {e.text}")

    def on_turn_end(self, e: Any) -> None:
        if not self.at_line_start:
            self.write("\n")

    def final(self, result: Any, critic: bool = True) -> None:
        """The answer and the summary line (nothing for a failed or interrupted dialogue)."""
        if result.stop_reason in SILENT_ERRORS:
            return
        with self.lock:
            self.line("")
            self.line(f"answer: {result.answer if result.answer is not None else '(no answer)'}")
            self.line(summary_line(result, critic))
            self.stream.flush()

    def close(self) -> None:
        self.stream.flush()

    def note(self, message: str, style: str = "") -> None:
        with self.lock:
            self.line(message)
            self.stream.flush()


class ProgressRenderer:
    """A one-line spinner on a terminal's stderr while the agents work (for ``--json`` and ``--quiet``)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.status = console.status("starting", spinner="dots")
        self.status.start()
        self.chars = 0
        self.where = ""
        self.doing = ""

    def __call__(self, event: Any) -> None:
        if event.kind == "turn_start":
            task = TASK_LABEL.get(event.data.get("task", ""), "")
            self.where, self.doing, self.chars = f"{event.agent} · round {event.round} · {task}", "thinking", 0
        elif event.kind == "delta":
            self.chars += len(event.text)
            self.doing = f"writing ({self.chars} chars)"
        elif event.kind == "code":
            self.doing = f"running step {event.data.get('step', '')}"
        elif event.kind == "output":
            self.doing = "thinking"
        else:
            return
        self.status.update(f"{self.where}: {self.doing}")

    def final(self, result: Any, critic: bool = True) -> None:
        self.close()

    def close(self) -> None:
        self.status.stop()

    def note(self, message: str, style: str = "dim") -> None:
        self.console.print(Text(message, style=style))


class NullRenderer:
    """Draws nothing."""

    def __call__(self, event: Any) -> None:
        pass

    def final(self, result: Any, critic: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def note(self, message: str, style: str = "") -> None:
        pass
