"""``duet repl``: an interactive session on one conversation, with line editing and streaming output.

Input (GNU readline when stdin is a terminal): arrow keys, Ctrl-R history search, history saved
across sessions (``$XDG_DATA_HOME/duet/repl_history.jsonl``), Tab completes commands, and three
ways to enter several lines: paste them (bracketed paste), end a line with ``\\``, or open a block
with a line ``\"\"\"`` and close it with another. Ctrl-C stops a response (or clears the line at the
prompt); Ctrl-D or /quit leaves. A line starting with ``//`` is a question starting with ``/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from duet.app.settings import Settings, clipboard_path, history_path, log_path
from duet.app.store import Store, StoreError
from duet.ui.conversation import Conversation, Exchange, followups_for

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (arguments, what it does)
    "/help": ("", "list these commands"),
    "/copy": ("[answer|response]", "copy the last answer (or the whole response) to the clipboard"),
    "/good": ("[comment]", "rate the last response good (saved in the feedback store)"),
    "/bad": ("[comment]", "rate the last response bad, with an optional comment"),
    "/regen": ("", "regenerate the last response from scratch with a new seed"),
    "/save": ("FILE", "save the conversation: FILE.json as JSON, any other name as Markdown"),
    "/model": ("[DIR|SPEC]", "show the models, or switch the solver to a checkpoint DIR (or backend SPEC)"),
    "/critic": ("[on|off]", "turn the critic on or off (no argument: show)"),
    "/followups": ("[on|off]", "questions follow up on the earlier ones, or each starts afresh (no argument: show)"),
    "/clear": ("", "start a new conversation"),
    "/quit": ("", "leave (also /exit and Ctrl-D)"),
}
ALIASES = {"/exit": "/quit", "/q": "/quit", "/?": "/help"}
HISTORY_KEEP = 1000
BLOCK = '"""'


# ---------------------------------------------------------------------------------------------- input


class LineReader:
    """Reads one entry (possibly several lines); readline with persistent history on a terminal."""

    def __init__(self, history: Path, prompt: str = "duet> ", more: str = "...> ", color: bool = False) -> None:
        self.history = history
        self.interactive = sys.stdin.isatty()
        self.readline: Any = None
        if color:
            prompt = f"\001\033[1;36m\002{prompt.rstrip()}\001\033[0m\002 "
            more = f"\001\033[2m\002{more.rstrip()}\001\033[0m\002 "
        self.prompt, self.more = prompt, more
        if self.interactive:
            self._setup_readline()

    def _setup_readline(self) -> None:
        try:
            import readline
        except ImportError:  # Windows without pyreadline: plain input() still works
            return
        self.readline = readline
        if "libedit" in (readline.__doc__ or ""):
            readline.parse_and_bind("bind ^I rl_complete")
        else:
            readline.parse_and_bind("tab: complete")
        readline.set_completer(self._complete)
        readline.set_completer_delims(" \t\n")  # "/" is one of readline's default delimiters: keep "/cl" whole
        readline.set_auto_history(False)  # whole entries are added, multi-line ones included
        readline.clear_history()
        for entry in self._load_history():
            readline.add_history(entry)

    def _complete(self, text: str, state: int) -> str | None:
        buffer = self.readline.get_line_buffer() if self.readline else text
        if not buffer.startswith("/") or " " in buffer:
            return None
        names = sorted([*COMMANDS, *ALIASES])
        matches = [n + " " for n in names if n.startswith(text)]
        return matches[state] if state < len(matches) else None

    def _load_history(self) -> list[str]:
        try:
            lines = self.history.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        entries = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, str):
                entries.append(entry)
        if len(lines) > 2 * HISTORY_KEEP:  # keep the file small
            try:
                self.history.write_text("".join(json.dumps(e) + "\n" for e in entries[-HISTORY_KEEP:]),
                                        encoding="utf-8")
            except OSError:
                pass
        return entries[-HISTORY_KEEP:]

    def remember(self, entry: str) -> None:
        """Add an entry to the history (in memory and on disk), skipping repeats."""
        if not entry.strip():
            return
        if self.readline is not None:
            n = self.readline.get_current_history_length()
            if n and self.readline.get_history_item(n) == entry:
                return
            self.readline.add_history(entry)
        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            with self.history.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        except OSError:
            pass

    @contextlib.contextmanager
    def quiet_typing(self) -> Iterator[None]:
        """While a response runs, keys typed are not echoed over the live output; they wait, and the next
        prompt shows them (type-ahead, as in a shell). Ctrl-C still interrupts (only ECHO is turned off)."""
        try:
            import termios

            fd = sys.stdin.fileno()
            saved = termios.tcgetattr(fd) if self.interactive else None
        except (ImportError, OSError, ValueError):  # not a terminal, or no termios (Windows)
            saved = None
        if saved is None:
            yield
            return
        quiet = list(saved)
        quiet[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
        try:
            yield
        finally:
            termios.tcsetattr(fd, termios.TCSANOW, saved)

    def read(self) -> str | None:
        """The next entry, or None at end of input (Ctrl-D). Ctrl-C raises KeyboardInterrupt."""
        try:
            first = input(self.prompt)
        except EOFError:
            return None
        if first.strip() == BLOCK:
            lines = []
            while True:
                try:
                    line = input(self.more)
                except EOFError:
                    break
                if line.strip() == BLOCK:
                    break
                lines.append(line)
            entry = "\n".join(lines)
        else:
            lines = [first]
            while lines[-1].endswith("\\") and not lines[-1].endswith("\\\\"):
                lines[-1] = lines[-1][:-1]
                try:
                    lines.append(input(self.more))
                except EOFError:
                    break
            entry = "\n".join(lines)
        self.remember(entry if first.strip() != BLOCK else f"{BLOCK}\n{entry}\n{BLOCK}")
        return entry


# ---------------------------------------------------------------------------------------------- the REPL


class Repl:
    """The loop: read, run a question or a command, render, log."""

    def __init__(self, settings: Settings, conversation: Conversation, renderer: Any, console: Any,
                 reader: LineReader, store: Store | None, build: Callable[[str], Any]) -> None:
        self.settings = settings
        self.conversation = conversation
        self.renderer = renderer
        self.console = console
        self.reader = reader
        self.store = store  # None: logging off
        self.build = build  # spec -> backend (for /model)
        self.session = os.urandom(6).hex()
        self.hinted = False
        self.interrupt_hint = False
        self.store_warned = False

    # -- output --------------------------------------------------------------------------------

    def say(self, message: str, style: str = "") -> None:
        from rich.text import Text

        self.console.print(Text(message, style=style))  # wrapped at words (a path longer than a line is folded)

    def error(self, message: str) -> None:
        self.say(f"error: {message}", "red")

    # -- loop ----------------------------------------------------------------------------------

    def banner(self) -> None:
        from duet import __version__

        critic = f"critic: {self.conversation.critic_name}" if self.conversation.critic_on else "critic: off"
        self.say(f"duet {__version__} · solver: {self.conversation.solver_name} · {critic}", "bold")
        if self.conversation.followups:
            how = "follow-ups keep the context"
        else:
            how = "each question starts afresh (/followups on keeps the context)"
        self.say(f"Ask a question; {how}. /help lists the commands, Ctrl-D leaves.", "dim")

    def loop(self) -> int:
        self.banner()
        while True:
            try:
                entry = self.reader.read()
            except KeyboardInterrupt:
                self.console.print()
                if not self.interrupt_hint:
                    self.say("(Ctrl-D or /quit leaves)", "dim")
                    self.interrupt_hint = True
                continue
            if entry is None:
                self.console.print()
                break
            text = entry.strip()
            if not text:
                continue
            try:
                if text.startswith("/") and not text.startswith("//"):
                    if self.command(text) == "quit":
                        break
                    continue
                self.ask(text[1:] if text.startswith("//") else text)
            except KeyboardInterrupt:  # e.g. while /model loads a checkpoint
                self.console.print()
                self.say("cancelled", "yellow")
            except Exception as error:  # a bug must not end the session (DUET_DEBUG=1 shows the traceback)
                if os.environ.get("DUET_DEBUG"):
                    raise
                self.error(f"unexpected {type(error).__name__}: {' '.join(str(error).split())}")
        if self.store is not None:
            self.store.close()
        return 0

    def run_turns(self, work: Callable[[threading.Event], Exchange]) -> Exchange:
        from duet.app.backends import run_cancellable

        cancel = threading.Event()

        def interrupted(count: int) -> None:
            self.renderer.note("stopping ..." if count == 1 else "still stopping ...", "yellow")

        try:
            with self.reader.quiet_typing():
                exchange = run_cancellable(lambda: work(cancel), cancel, interrupted)
        finally:
            self.renderer.close()
        self.renderer.final(exchange.result, critic=self.conversation.critic_on)
        if exchange.interrupted:
            self.say("interrupted: the partial response is not kept in the conversation; /regen runs it again",
                     "yellow")
        elif exchange.result.stop_reason in ("backend_error", "sandbox_error"):
            self.error(exchange.result.error or exchange.result.stop_reason)
        self.log(exchange)
        if not self.hinted:
            self.say("/copy · /good · /bad [comment] · /regen · /save FILE · /help", "dim")
            self.hinted = True
        return exchange

    def ask(self, question: str) -> None:
        self.run_turns(lambda cancel: self.conversation.ask(question, cancel))

    def log(self, exchange: Exchange) -> None:
        if self.store is None:
            return
        try:
            exchange.log_id = self.store.log_exchange(exchange.result, command="repl", session=self.session,
                                                      parent_id=exchange.regen_of)
        except StoreError as error:
            if not self.store_warned:
                self.say(f"warning: not logged: {error}", "yellow")
                self.store_warned = True

    # -- commands ------------------------------------------------------------------------------

    def command(self, text: str) -> str | None:
        name, _, arg = text.partition(" ")
        name = ALIASES.get(name.lower(), name.lower())
        arg = arg.strip()
        handler = {
            "/help": self.cmd_help, "/copy": self.cmd_copy, "/good": self.cmd_good, "/bad": self.cmd_bad,
            "/regen": self.cmd_regen, "/save": self.cmd_save, "/model": self.cmd_model, "/critic": self.cmd_critic,
            "/clear": self.cmd_clear, "/followups": self.cmd_followups,
        }.get(name)
        if name == "/quit":
            return "quit"
        if handler is None:
            self.error(f"unknown command {name}; /help lists them (start with // to ask something that begins "
                       "with /)")
            return None
        handler(arg)
        return None

    def cmd_help(self, arg: str) -> None:
        from rich.table import Table
        from rich.text import Text

        table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
        for name, (args, what) in COMMANDS.items():
            table.add_row(Text(f"{name} {args}".strip(), style="bold"), Text(what))
        self.console.print(table)
        self.say("Multi-line input: paste it, end lines with \\, or put it between two \"\"\" lines. "
                 "Ctrl-C stops a response; Ctrl-R searches the history.", "dim")

    def _need_last(self) -> Exchange | None:
        if self.conversation.last is None:
            self.error("no response yet: ask a question first")
        return self.conversation.last

    def cmd_copy(self, arg: str) -> None:
        from duet.ui.clipboard import copy_text

        last = self._need_last()
        if last is None:
            return
        if arg not in ("", "answer", "response"):
            self.error("/copy takes answer or response")
            return
        if arg != "response" and last.result.answer is not None:
            text, what = last.result.answer, "the answer"
        else:
            text, what = last.response, "the response"
            if not text:
                self.error("the last response is empty")
                return
        try:
            copied = copy_text(text, mode=self.settings.clipboard, fallback=clipboard_path(), terminal=sys.stdout)
        except OSError as error:
            self.error(f"cannot copy: {error}")
            return
        self.say(copied.describe(what), "green" if copied.method != "file" else "yellow")

    def cmd_good(self, arg: str) -> None:
        self._rate("good", arg)

    def cmd_bad(self, arg: str) -> None:
        self._rate("bad", arg)

    def _rate(self, rating: str, comment: str) -> None:
        last = self._need_last()
        if last is None:
            return
        store, note = self.store, ""
        try:
            if store is None:  # logging is off: the rated exchange is stored with its rating, and only it
                store = Store(log_path())
                note = " (logging is off: this exchange was stored with its rating)"
            if last.log_id is None:
                last.log_id = store.log_exchange(last.result, command="repl", session=self.session,
                                                 parent_id=last.regen_of)
            store.rate(last.log_id, rating, comment or None)
        except StoreError as error:
            self.error(str(error))
            return
        finally:
            if store is not self.store and store is not None:
                store.close()
        why = f": {comment}" if comment else ""
        self.say(f"rated exchange #{last.log_id} {rating}{why}{note}", "green" if rating == "good" else "yellow")

    def cmd_regen(self, arg: str) -> None:
        last = self._need_last()
        if last is None:
            return
        temperature = last.temperature or self.settings.regen_temperature
        self.say(f"regenerating with seed {last.seed + 1}, temperature {temperature:g}", "dim")
        self.run_turns(lambda cancel: self.conversation.regen(cancel))

    def cmd_save(self, arg: str) -> None:
        from duet.app.store import now
        from duet.ui.export import save_session

        if not arg:
            self.error("/save needs a file name: /save notes.md or /save run.json")
            return
        results = [e.result for e in self.conversation.exchanges]
        if not results:
            self.error("nothing to save yet")
            return
        path = Path(arg).expanduser()
        try:
            kind = save_session(path, results, now())
        except OSError as error:
            self.error(f"cannot write {path}: {error.strerror or error}")
            return
        n = len(results)
        self.say(f"saved {n} exchange{'s' if n != 1 else ''} to {path} ({kind})", "green")

    def cmd_model(self, arg: str) -> None:
        from duet.agents.backends import backend_kinds

        if not arg:
            critic = self.conversation.critic_name if self.conversation.critic_on else "off"
            same = " (the solver's)" if self.conversation.critic_backend is None and self.conversation.critic_on else ""
            self.say(f"solver: {self.conversation.solver_name}\ncritic: {critic}{same}")
            return
        kind = arg.partition(":")[0]
        spec = arg if ":" in arg and kind in backend_kinds() else "local:" + str(Path(arg).expanduser())
        try:
            backend = self.build(spec)
        except Exception as error:  # a bad path or server stays a one-line message
            self.error(" ".join(str(error).split()))
            return
        self.conversation.set_solver(backend, None if self.conversation.critic_backend is None
                                     else self.conversation.critic_backend)
        self.say(f"solver: {self.conversation.solver_name} (the conversation continues)", "green")
        followups = followups_for(self.settings, spec)
        if followups != self.conversation.followups:
            self.conversation.followups = followups
            self.cmd_followups("")

    def cmd_critic(self, arg: str) -> None:
        if arg not in ("", "on", "off"):
            self.error("/critic takes on or off")
            return
        if arg:
            self.conversation.set_critic(arg == "on")
        self.say(f"critic: {'on' if self.conversation.critic_on else 'off'}", "green")

    def cmd_followups(self, arg: str) -> None:
        if arg not in ("", "on", "off"):
            self.error("/followups takes on or off")
            return
        if arg:
            self.conversation.followups = arg == "on"
        self.say("follow-ups: on (questions keep the context)" if self.conversation.followups
                 else "follow-ups: off (each question starts afresh)", "green")

    def cmd_clear(self, arg: str) -> None:
        self.conversation.clear()
        self.say("new conversation", "green")


# ---------------------------------------------------------------------------------------------- entry


def run_repl(flags: dict[str, Any], replies: str | None = None) -> int:
    """The whole command; returns the exit code."""
    from duet.app.backends import build_backend
    from duet.terminal import SafeConsole
    from duet.ui.render import PlainRenderer, RichRenderer
    from duet.ui.solve import loading_status, open_backends

    settings, specs, solver, critic = open_backends(flags, replies)
    console = SafeConsole(highlight=False)
    renderer = RichRenderer(console) if console.is_terminal else PlainRenderer(sys.stdout)
    conversation = Conversation(settings, solver, critic, on_event=renderer,
                                followups=followups_for(settings, specs.solver))
    reader = LineReader(history_path(), color=console.is_terminal and not console.no_color)
    store = Store(log_path()) if settings.log else None

    def build(spec: str) -> Any:
        from duet.app.backends import Specs

        with loading_status(settings, Specs(spec)):
            return build_backend(spec, settings)

    return Repl(settings, conversation, renderer, console, reader, store, build).loop()
