"""`duet repl` driven as a person uses it: a real pseudo-terminal (pexpect) on the scripted backend.

What the screen shows is read from the terminal stream with the escape sequences removed; what was
stored is read from the SQLite log, the history file, the clipboard file and the saved transcripts.
Also: the conversation logic (follow-ups, /regen, interrupt) and the clipboard, in process.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest

from duet.agents.backends import ScriptedBackend
from duet.app.settings import load_settings
from duet.ui.clipboard import copy_text, osc52_sequence, osc52_supported
from duet.ui.conversation import Conversation, followups_for
from tests.processes import default_sigint

pexpect = pytest.importorskip("pexpect")

DUET = Path(sys.executable).with_name("duet")
ANSI = re.compile(r"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\r")
PARTIAL = re.compile(r"\x1b[^\x07a-zA-Z~]*$")  # an escape sequence cut off at the end of what was read

QUESTION = "A baker has 23 loaves and bakes 4 trays of 12 more. How many loaves does he have?"
FIRST = ("Count the loaves.\n```python\nprint(23 + 4 * 12)\n```\n```output\n(placeholder)\n```\n"
         "He has \\boxed{71} loaves.")
AGREE_71 = "VERDICT: AGREE\n\\boxed{71}"
FOLLOW = "Twice 71 is 140, so \\boxed{140}."
DISAGREE = "VERDICT: DISAGREE: 2 * 71 is 142.\n\\boxed{142}"
REVISED = "Recomputed: 2 * 71 = 142, so \\boxed{142}."
AGREE_142 = "VERDICT: AGREE\n\\boxed{142}"
REGEN = "Doubling 71 gives \\boxed{142}."


class Terminal:
    """A `duet repl` in a pseudo-terminal; ``expect`` waits for text on the (escape-free) screen stream."""

    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.raw = ""
        self.mark = 0
        self.child = pexpect.spawn(str(DUET), ["repl", *args], env=env or environment(home), cwd=str(home),
                                   encoding="utf-8", dimensions=(40, 110), timeout=30, preexec_fn=default_sigint)

    @property
    def screen(self) -> str:
        return ANSI.sub("", PARTIAL.sub("", self.raw))

    def expect(self, text: str, timeout: float = 30) -> str:
        """Wait until ``text`` appears after the previous match; return what came before it."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen
            found = screen.find(text, self.mark)
            if found >= 0:
                before, self.mark = screen[self.mark:found], found + len(text)
                return before
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} not on the screen; after the last match:\n{screen[self.mark:]}")
            try:
                self.raw += self.child.read_nonblocking(65536, timeout=min(left, 1.0))
            except pexpect.TIMEOUT:
                pass
            except pexpect.EOF:
                if text not in self.screen[self.mark:]:
                    raise AssertionError(f"the REPL ended before {text!r}:\n{self.screen[self.mark:]}") from None

    def ask(self, line: str) -> str:
        """Send a line, wait for the next prompt; return what the screen showed in between."""
        self.child.sendline(line)
        return self.expect("duet> ")

    def finish(self) -> int:
        self.child.expect(pexpect.EOF, timeout=30)
        self.raw += self.child.before or ""
        self.child.close()
        return self.child.exitstatus


def environment(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DUET_", "XDG_", "SSH_", "TMUX"))}
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "TERM_PROGRAM", "KITTY_WINDOW_ID", "WEZTERM_PANE", "WT_SESSION"):
        env.pop(name, None)
    env.update(HOME=str(home / "home"), XDG_CONFIG_HOME=str(home / "config"), XDG_DATA_HOME=str(home / "data"),
               TERM="xterm", LANG="C.UTF-8", **extra)
    return env


def scripted(home: Path, *replies: str, delay: float = 0.0, name: str = "replies.json") -> str:
    path = home / name
    path.write_text(json.dumps({"replies": list(replies), "delay": delay}))
    return f"scripted:{path}"


def db(home: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(home / "data" / "duet" / "logs.sqlite3")
    conn.row_factory = sqlite3.Row
    return conn


def test_a_session_ask_follow_up_regen_rate_copy_save_quit(tmp_path):
    backend = scripted(tmp_path, FIRST, AGREE_71, FOLLOW, DISAGREE, REVISED, AGREE_142, REGEN, AGREE_142)
    term = Terminal(tmp_path, "--backend", backend)
    banner = term.expect("duet> ")
    assert "solver: scripted:replies.json" in banner and "/help" in banner

    shown = term.ask(QUESTION)
    assert "solver · round 1 · solving" in shown and "critic · round 1 · checking" in shown
    assert "print(23 + 4 * 12)" in shown and "71" in shown  # the code and its real output
    assert "✔ the critic agrees" in shown
    assert re.search(r"answer ─+╮\n│ 71 +│\n╰─ agreed: yes · 1 round · stop: agreed", shown), shown
    assert "/copy · /good · /bad [comment] · /regen" in shown

    shown = term.ask("/bad too slow")
    assert "rated exchange #1 bad: too slow" in shown

    shown = term.ask("And twice that many?")  # a follow-up: disagreement, then a revision
    assert "solver · round 1 · follow-up" in shown and "✘ the critic disagrees: 2 * 71 is 142." in shown
    assert "solver · round 2 · revising" in shown and "agreed: yes · 2 rounds" in shown

    shown = term.ask("/regen")
    assert "regenerating with seed 1, temperature 0.7" in shown and "Doubling 71 gives" in shown
    assert "agreed: yes · 1 round" in shown

    assert "rated exchange #3 good: clear" in term.ask("/good clear")
    shown = term.ask("/copy")
    clipboard = tmp_path / "data" / "duet" / "clipboard.txt"
    assert f"no clipboard reachable here: wrote the answer to {clipboard}" in " ".join(shown.split())  # wrapped
    assert clipboard.read_text() == "142\n"
    assert "wrote the response to" in term.ask("/copy response")
    assert clipboard.read_text().startswith("Doubling 71 gives")
    assert "saved 2 exchanges to notes.md (Markdown)" in term.ask("/save notes.md")
    assert "saved 2 exchanges to run.json (JSON)" in term.ask("/save run.json")
    assert "solver: scripted:replies.json" in term.ask("/model")
    assert "unknown command /frobnicate" in term.ask("/frobnicate")
    term.child.sendline("/quit")
    assert term.finish() == 0

    rows = db(tmp_path).execute("SELECT * FROM exchanges ORDER BY id").fetchall()
    assert [(r["id"], r["command"], r["answer"], r["stop_reason"], r["rounds"]) for r in rows] == [
        (1, "repl", "71", "agreed", 1), (2, "repl", "142", "agreed", 2), (3, "repl", "142", "agreed", 1)]
    assert rows[2]["parent_id"] == 2 and (rows[2]["seed"], rows[2]["temperature"]) == (1, 0.7)
    assert rows[0]["session"] == rows[2]["session"]
    follow_up = json.loads(rows[1]["transcript"])["turns"][0]["messages"]
    assert QUESTION in follow_up[1]["content"] and "\\boxed{71}" in follow_up[2]["content"]  # context kept
    regen = json.loads(rows[2]["transcript"])["turns"][0]["messages"]
    assert len(regen) == len(follow_up) and "Twice 71" not in json.dumps(regen)  # from the state before
    ratings = db(tmp_path).execute("SELECT exchange_id, rating, comment FROM ratings ORDER BY exchange_id")
    assert [tuple(r) for r in ratings] == [(1, "bad", "too slow"), (3, "good", "clear")]

    saved = json.loads((tmp_path / "run.json").read_text())
    assert [e["answer"] for e in saved["exchanges"]] == ["71", "142"]
    assert saved["exchanges"][1]["turns"][0]["text"].startswith("Doubling 71")
    notes = (tmp_path / "notes.md").read_text()
    assert "## 1. A baker has 23 loaves" in notes and "**Answer:** 142" in notes and "```output\n71\n```" in notes


def test_ctrl_c_stops_a_response_then_paste_history_osc52_and_ctrl_d(tmp_path):
    backend = scripted(tmp_path, "Pasted: \\boxed{2}", delay=2.0)  # an interrupted call uses up no reply
    env = environment(tmp_path, DUET_CLIPBOARD="osc52")
    term = Terminal(tmp_path, "--backend", backend, "--no-critic", env=env)
    term.expect("duet> ")

    term.child.sendline("What takes long?")
    term.expect("solver is thinking")
    started = time.monotonic()
    term.child.sendintr()
    shown = term.expect("duet> ")
    assert time.monotonic() - started < 1.5  # the scripted reply would have taken 2 s
    assert "stopping ..." in shown and "interrupted: the partial response is not kept" in shown

    term.child.sendintr()  # Ctrl-C at the prompt does not leave
    assert "(Ctrl-D or /quit leaves)" in term.expect("duet> ")

    term.child.send("\x1b[200~Line one of the problem,\nline two of it.\x1b[201~")  # bracketed paste
    term.child.send("\r")
    shown = term.expect("duet> ")
    assert "Pasted:" in shown and "critic: off · 1 round · stop: no_critic" in shown

    term.child.sendline("/copy")
    shown = term.expect("duet> ")
    assert "copied the answer to the clipboard via OSC 52" in shown
    assert "\x1b]52;c;" + base64.b64encode(b"2").decode() + "\x07" in term.raw

    term.child.send("\x1b[A")  # arrow up: the last entry comes back
    term.child.send("\r")
    assert "copied the answer to the clipboard via OSC 52" in term.expect("duet> ")
    term.child.sendeof()
    assert term.finish() == 0

    rows = db(tmp_path).execute("SELECT question, stop_reason, answer FROM exchanges ORDER BY id").fetchall()
    assert [tuple(r) for r in rows] == [("What takes long?", "interrupted", None),
                                        ("Line one of the problem,\nline two of it.", "no_critic", "2")]
    history = [json.loads(x) for x in (tmp_path / "data" / "duet" / "repl_history.jsonl").read_text().splitlines()]
    assert history == ["What takes long?", "Line one of the problem,\nline two of it.", "/copy"]

    again = Terminal(tmp_path, "--backend", backend, "--no-critic", "--no-log", env=env)  # history persists
    again.expect("duet> ")
    again.child.send("\x12Line one")  # Ctrl-R: reverse history search
    again.expect("reverse-i-search")
    again.child.send("\r")  # readline redraws the accepted line after its prompt, then the answer comes
    again.expect("Pasted: \\boxed{2}")
    again.expect("duet> ")
    again.child.sendline("/exit")
    assert again.finish() == 0
    assert db(tmp_path).execute("SELECT COUNT(*) FROM exchanges").fetchone()[0] == 2  # --no-log


def test_multi_line_blocks_critic_switch_and_errors_on_the_screen(tmp_path):
    backend = scripted(tmp_path, "Solo: \\boxed{5}", "Solo again: \\boxed{6}")
    other = scripted(tmp_path, "Other model: \\boxed{7}", name="other.json")
    term = Terminal(tmp_path, "--backend", backend, "--critic")
    term.expect("duet> ")
    shown = term.ask("/help")
    assert "/bad [comment]" in shown and "/copy [answer|response]" in shown and "/critic [on|off]" in shown
    assert "critic: off" in term.ask("/critic off")
    assert "follow-ups: on (questions keep the context)" in term.ask("/followups")  # on: not the embedded model
    assert "error: /followups takes on or off" in term.ask("/followups maybe")
    term.child.sendline('"""')
    term.child.sendline("first line")
    term.child.sendline('second line"""')  # not a closing line: the block goes on
    term.child.sendline('"""')
    assert "Solo: \\boxed{5}" in term.expect("duet> ")
    term.child.sendline("continued \\")
    term.child.sendline("question")
    assert "Solo again" in term.expect("duet> ")
    shown = term.ask("/regen")  # no scripted reply left: a backend error, shown in one line, and the REPL goes on
    assert re.search(r"error: scripted:replies.json: no scripted reply left", shown), shown
    assert "error: /save needs a file name" in term.ask("/save")
    shown = term.ask("/save /no/such/dir/x.md")  # a mistyped directory is not created (QA)
    assert "error: cannot write /no/such/dir/x.md: no such directory /no/such/dir" in shown
    assert "error: /no/such/checkpoint: no such checkpoint directory" in term.ask("/model /no/such/checkpoint")
    assert "solver: scripted:other.json (the conversation continues)" in term.ask(f"/model {other}")
    assert "Other model: \\boxed{7}" in term.ask("and with the other model?")
    term.child.send("/cl\t")  # Tab completes a command ("/" is not a word break)
    term.child.send("\r")
    assert "new conversation" in term.expect("duet> ")
    term.child.sendline("/quit")
    assert term.finish() == 0
    questions = [r[0] for r in db(tmp_path).execute("SELECT question FROM exchanges ORDER BY id")]
    assert questions == ['first line\nsecond line"""', "continued \nquestion", "continued \nquestion",
                         "and with the other model?"]


# ------------------------------------------------------------------------------------------ in process


def conversation(tmp_path, *replies: str, **flags) -> tuple[Conversation, ScriptedBackend]:
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "c"), "XDG_DATA_HOME": str(tmp_path / "d")}
    backend = ScriptedBackend(list(replies))
    return Conversation(load_settings(flags, env), backend), backend


def test_conversation_follow_up_regen_and_interrupt(tmp_path):
    conv, backend = conversation(tmp_path, "A \\boxed{1}", "B \\boxed{2}", "C \\boxed{3}", "D \\boxed{4}",
                                 critic=False)
    conv.ask("first?")
    second = conv.ask("second?")
    assert second.result.turns[0].task == "follow_up" and len(conv.exchanges) == 2
    before = [dict(m) for m in conv.dialogue.solver.conversation]
    regen = conv.regen()
    assert (regen.seed, regen.temperature, regen.result.answer) == (1, 0.7, "3")
    assert backend.calls[-1].request.seed == 1 and backend.calls[-1].request.temperature == 0.7
    assert [e.result.answer for e in conv.exchanges] == ["1", "3"]
    assert len(conv.dialogue.solver.conversation) == len(before)
    cancel = threading.Event()
    cancel.set()
    stopped = conv.ask("third?", cancel)
    assert stopped.interrupted and conv.last is stopped and len(conv.exchanges) == 2
    assert conv.dialogue.questions == ["first?", "second?"]  # the interrupted question left no trace
    conv.set_critic(True)
    assert conv.dialogue.critic is not None and conv.dialogue.questions == ["first?", "second?"]
    conv.clear()
    assert conv.dialogue.solver.conversation == [] and conv.last is None


def test_without_followups_each_question_starts_afresh(tmp_path):
    conv, backend = conversation(tmp_path, "A \\boxed{1}", "B \\boxed{2}", critic=False)
    conv.followups = False
    conv.ask("first?")
    second = conv.ask("second?")
    assert second.result.turns[0].task == "solve" and conv.dialogue.questions == ["second?"]
    assert "first?" not in json.dumps(backend.calls[-1].messages)
    assert [e.result.answer for e in conv.exchanges] == ["1", "2"]  # both stay for /save


def test_followups_are_off_by_default_only_for_the_embedded_model(tmp_path, monkeypatch):
    """The embedded model was trained on single problems: asked a follow-up, it solved the first problem again
    and its critic agreed (QA). Unset, follow-ups are off for it and on for any other model."""
    from duet.model.embedded import EMBEDDED_DIR

    monkeypatch.delenv("DUET_MODEL", raising=False)
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "c"), "XDG_DATA_HOME": str(tmp_path / "d")}
    unset = load_settings({}, env)
    assert not followups_for(unset, "local:") and not followups_for(unset, f"local:{EMBEDDED_DIR}")
    assert followups_for(unset, f"local:{tmp_path}") and followups_for(unset, "openai:http://h/v1#m")
    assert followups_for(load_settings({"followups": True}, env), "local:")
    assert not followups_for(load_settings({}, {**env, "DUET_FOLLOWUPS": "false"}), "scripted:x.json")


def test_clipboard_choices(tmp_path, monkeypatch):
    fallback = tmp_path / "clip.txt"
    assert osc52_supported({"TERM": "xterm-kitty"}) and osc52_supported({"TERM_PROGRAM": "WezTerm"})
    assert not osc52_supported({"TERM": "xterm"})
    assert osc52_sequence("hi", {}) == "\x1b]52;c;aGk=\x07"
    assert osc52_sequence("hi", {"TMUX": "1"}) == "\x1bPtmux;\x1b\x1b]52;c;aGk=\x07\x1b\\"

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    copied = copy_text("hi", fallback=fallback, terminal=tty, env={"TERM": "xterm-kitty"})
    assert copied.method == "osc52" and tty.getvalue() == "\x1b]52;c;aGk=\x07"
    copied = copy_text("hi", fallback=fallback, terminal=tty, env={"TERM": "xterm", "SSH_TTY": "/dev/pts/1"})
    assert copied.method == "file" and fallback.read_text() == "hi\n"
    assert "wrote the answer to" in copied.describe("the answer")
    copied = copy_text("big" * 50_000, fallback=fallback, mode="osc52", terminal=tty, env={"TERM": "xterm-kitty"})
    assert copied.method == "file"  # too long for OSC 52


def test_two_ctrl_cs_a_millisecond_apart_never_escape_the_wait():
    """A KeyboardInterrupt raised while the previous one was being handled used to escape run_cancellable, and the
    REPL showed its prompt while the agents went on printing (QA: 1 run in 16). Now SIGINT only counts there."""
    import signal

    from duet.app.backends import run_cancellable

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # CI may run us with SIGINT ignored
    try:
        for _ in range(5):
            cancel, seen = threading.Event(), []

            def work(cancel: threading.Event = cancel) -> str:
                assert cancel.wait(5), "no Ctrl-C arrived"
                time.sleep(0.5)  # winding down, while the second Ctrl-C is handled
                return "wound down"

            def press_twice() -> None:
                time.sleep(0.1)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.001)
                os.kill(os.getpid(), signal.SIGINT)

            threading.Thread(target=press_twice, daemon=True).start()
            assert run_cancellable(work, cancel, seen.append) == "wound down"
            # two SIGINTs sent before the first is handled are one pending signal (a busy machine): 1 or 2
            assert seen in ([1], [1, 2])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_answer_summary_goes_below_the_panel_on_a_narrow_terminal(tmp_path):
    """A panel's subtitle is cut, not wrapped: on 30 columns the stop reason and tokens were lost (QA)."""
    from rich.console import Console

    from duet.ui.render import RichRenderer, summary_line

    conv, _ = conversation(tmp_path, "A \\boxed{12}", critic=False)
    result = conv.ask("q?").result
    for width, below in ((100, False), (30, True)):
        out = io.StringIO()
        RichRenderer(Console(file=out, width=width, force_terminal=False, color_system=None)).final(result,
                                                                                                  critic=False)
        text = out.getvalue()
        summary = summary_line(result, critic=False)
        assert "│ 12" in text and summary in " ".join(text.split()), text  # whole, if wrapped
        assert text.rstrip().endswith("╯") != below, text  # below the panel only when narrow


def test_stopping_comes_after_the_text_streamed_before_it():
    """The note went above the live area, so "stopping ..." showed above text written before it (QA)."""
    from rich.console import Console

    from duet.agents.events import Event
    from duet.ui.render import RichRenderer

    out = io.StringIO()
    renderer = RichRenderer(Console(file=out, width=80, force_terminal=False, color_system=None))
    renderer(Event("turn_start", "solver", 1, data={"task": "solve"}))
    renderer(Event("delta", "solver", 1, "Combine the numbers step by step."))
    renderer.note("stopping ...")
    renderer(Event("turn_end", "solver", 1, data={"finish": "cancelled"}))
    renderer.close()
    text = out.getvalue()
    assert text.index("Combine the numbers") < text.index("stopping ...")
    assert text.count("Combine the numbers") == 1


def test_keys_typed_during_a_response_wait_for_the_next_prompt(tmp_path):
    """They were echoed onto the live spinner line, then shown again at the prompt (QA); now they are type-ahead."""
    backend = scripted(tmp_path, "Slow: \\boxed{1}", "Next: \\boxed{2}", delay=1.0)
    term = Terminal(tmp_path, "--backend", backend, "--no-critic")
    term.expect("duet> ")
    term.child.sendline("first?")
    term.expect("solver is thinking")
    term.child.send("second?")
    shown = term.expect("duet> ")
    assert "Slow:" in shown and "second?" not in shown, shown
    term.child.send("\r")  # the typed-ahead question, shown at the prompt by readline, is asked
    assert "Next: \\boxed{2}" in term.expect("duet> ")
    term.child.sendline("/quit")
    assert term.finish() == 0
    questions = [r[0] for r in db(tmp_path).execute("SELECT question FROM exchanges ORDER BY id")]
    assert questions == ["first?", "second?"]


def test_escape_sequences_from_the_model_and_its_code_never_reach_the_terminal(tmp_path):
    """Issue 19, attack 5: a clipboard write (OSC 52), a window title and a screen clear, once in the
    model's own text and once printed by the code it runs, reach the terminal only made visible."""
    attack = "\x1b]52;c;cHduZWQ=\x07\x1b]0;PWNED\x07\x1b[2J"
    reply = (f"Let me see {attack.replace('PWNED', 'MODELTITLE')} this.\n```python\nprint({attack!r})\n```\n"
             "```output\n(placeholder)\n```\nSo \\boxed{7}.")
    verdict = f"VERDICT: DISAGREE: {attack.replace('PWNED', 'CRITIC')}\n\\boxed{{7}}"
    backend = scripted(tmp_path, reply, verdict, "Still \\boxed{7}.", "VERDICT: AGREE\n\\boxed{7}")
    project = str(Path(__file__).resolve().parents[1])  # this checkout's duet, not an installed one
    term = Terminal(tmp_path, "--backend", backend, env=environment(tmp_path, PYTHONPATH=project))
    term.expect("duet> ")
    term.ask("What is 7?")
    term.child.sendline("/quit")
    term.finish()
    raw = term.raw
    for title in ("PWNED", "MODELTITLE", "CRITIC"):
        assert f"^[]0;{title}" in raw, title  # shown, as text
        assert f"\x1b]0;{title}" not in raw
    assert "\x1b]52" not in raw and "\x1b[2J" not in raw
    assert "\x07" not in raw and "cHduZWQ=\x07" not in raw
