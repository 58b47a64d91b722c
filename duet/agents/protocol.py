r"""The text protocol between the agents, their model and the sandbox (the exact strings).

A small model is trained on exactly this format, so it is kept exact and compact.

Solver turn (one assistant message that grows)::

    <one short step in words>
    ```python
    <code>
    ```
    ```output
    <what the code printed, written by duet>
    ```
    <next step> ... and at the end: \boxed{<final answer>}

1. The model writes a step and a ```` ```python ```` block, then opens the output fence itself:
   generation stops at the stop string :data:`STOP` (```` ```output ````), so it never invents output.
2. duet runs every ```` ```python ```` (or ```` ```py ````) block of that piece of text, in order, as one
   cell of a sandbox session that keeps state across cells (like a notebook), and appends
   ```` ```output\n<content>\n```\n```` to the assistant message (see :func:`format_output`).
3. The backend is asked to *continue* that same partial assistant message; repeat.
4. The turn ends when the model ends its turn (EOS). The answer is the last ``\boxed{...}`` outside
   code and output blocks.

Fences are read line by line: a block opens at a line that is exactly ```` ```python ```` or
```` ```py ```` (surrounding spaces allowed) and closes at the next line that is exactly ```` ``` ````.
So ```` ```python ```` inside a string on a code line is just code. Other fences (```` ```text ````,
```` ```output ````) are skipped whole. Edge cases, decided:

* stop string right after the code, without a closing fence (```` ```python\nx=1\n```output ````):
  the block is taken as closed; duet writes the missing ```` ``` ```` line before the output block.
* the model ends its turn (or a server does not report the stop string) right after a closed block,
  with nothing after it and no ``\boxed{}`` yet: the block is run and generation continues.
* a server that strips the stop string and does not say whether a stop string or the end of the turn
  ended the text (llama.cpp): text that ends with a code block, closed or not, ended at the stop string.
* a block still open when the turn ends (EOS or ``max_tokens``) is *not* run (it is likely cut off);
  the turn ends and an ``error`` event says so.
* the stop string with no code block before it: the output block says ``(no code to run)``.
* more than ``max_steps`` code cells in a turn: the cell is not run; its output block says
  :data:`STEP_LIMIT_NOTE`; one more continuation is allowed, then the turn ends.

Output block content (what the model reads): stdout (including the echo of a bare last expression);
on an error, the trimmed traceback (the last frame's ``File`` line, its code line, the one-line error);
a first line :data:`STATE_LOST_NOTE` when the session had to restart; capped at ~1,000 characters
keeping the head and the tail around a ``... (truncated)`` line (only the head's whole lines and that line when the
sandbox itself cut the output, whose tail is then unknown); ``(no output)`` when empty. Any
```` ``` ```` in the output is written as ``'''`` so it cannot close the fence.

Critic turn: the same step / code / output protocol in its own sandbox session, given the problem and
the solver's whole last solution; it ends with a line ``VERDICT: AGREE`` or
``VERDICT: DISAGREE: <one-line reason>``, and ``\boxed{<its own answer>}`` when it has one.
:func:`parse_verdict` reads the last verdict line outside code/output blocks, leniently (any case,
``**bold**``, missing colons) and deterministically; no verdict line gives ``"none"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from duet.answers import extract_boxed

STOP = "```output"
"""The stop string: the model opens the output fence and duet writes the output."""

CODE_FENCES = ("```python", "```py")
OUTPUT_OPEN = "```output\n"
FENCE_CLOSE = "```"
OUTPUT_LIMIT = 1000
TRUNCATED = "... (truncated)"
NO_OUTPUT = "(no output)"
NO_CODE = "(no code to run)"
STATE_LOST_NOTE = "(the session restarted: variables from earlier blocks are gone)"
STEP_LIMIT_NOTE = r"(step limit reached: the code was not run; write the final answer in \boxed{} now)"
TRACEBACK_LINES = 4

AGREE, DISAGREE, NO_VERDICT = "agree", "disagree", "none"


@dataclass
class CodeBlock:
    """A fenced python block found in a piece of text (offsets are into that text)."""

    code: str
    start: int  # offset of the opening fence line
    end: int  # offset just after the closing fence line (or the end of text when not closed)
    closed: bool


def _lines(text: str) -> list[tuple[int, str]]:
    """``(offset, line)`` for each line, keeping line ends."""
    out, offset = [], 0
    for line in text.splitlines(keepends=True):
        out.append((offset, line))
        offset += len(line)
    return out


def find_code_blocks(text: str) -> list[CodeBlock]:
    """The python blocks of ``text``, in order; the last may be unclosed (``closed=False``)."""
    blocks: list[CodeBlock] = []
    mode, start, body = "", 0, []  # mode: "" outside, "code" in python, "other" in another fence
    for offset, line in _lines(text):
        bare = line.strip()
        if mode == "":
            if bare in CODE_FENCES:
                mode, start, body = "code", offset, []
            elif bare.startswith("```"):
                mode = "other"
        elif bare == FENCE_CLOSE:
            if mode == "code":
                blocks.append(CodeBlock("".join(body).rstrip("\n"), start, offset + len(line), True))
            mode = ""
        elif mode == "code":
            body.append(line)
    if mode == "code":
        blocks.append(CodeBlock("".join(body).rstrip("\n"), start, len(text), False))
    return blocks


def prose(text: str) -> str:
    """``text`` without its fenced blocks (code, output, any other); an unclosed fence runs to the end."""
    kept, inside = [], False
    for _, line in _lines(text):
        bare = line.strip()
        if not inside and bare.startswith("```"):
            inside = True
        elif inside and bare == FENCE_CLOSE:
            inside = False
        elif not inside:
            kept.append(line)
    return "".join(kept)


def output_block(content: str) -> str:
    """The exact text duet appends after a code block: ```` ```output\n<content>\n```\n ````."""
    return f"{OUTPUT_OPEN}{content}\n{FENCE_CLOSE}\n"


def format_cell(step: str, code: str, output: str) -> str:
    """One whole step as it appears in an assistant message (for building training data):
    ``<step>\n```python\n<code>\n```\n```output\n<output>\n```\n``."""
    return f"{step}\n{CODE_FENCES[0]}\n{code}\n{FENCE_CLOSE}\n{output_block(output)}"


def trim_traceback(stderr: str, error: str | None) -> str:
    """The few lines of a traceback a model needs: last frame, its code line, the one-line error.

    Lines the sandbox adds about itself (``[sandbox] ...``) are dropped: a restart is said once, by
    :data:`STATE_LOST_NOTE`.
    """
    lines = [ln.rstrip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("[sandbox]")]
    frames = [i for i, ln in enumerate(lines) if ln.lstrip().startswith('File "')]
    tail = lines[frames[-1] :] if frames else lines[-TRACEBACK_LINES:]
    tail = [ln for ln in tail if set(ln.strip()) - set("^~ ")]  # drop the caret markers
    tail = tail[-TRACEBACK_LINES:]
    error = (error or "").strip()
    if error and (not tail or error not in tail[-1]):
        tail.append(error)
    return "\n".join(tail) if tail else "Error"


def clip(text: str, limit: int = OUTPUT_LIMIT) -> str:
    """Cap ``text`` near ``limit`` characters, keeping the head (2/3) and the tail (1/3) on line ends."""
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 2 // 3], text[-(limit // 3) :]
    if "\n" in head[limit // 3 :]:
        head = head[: head.rindex("\n")]
    if "\n" in tail[: limit // 6]:
        tail = tail[tail.index("\n") + 1 :]
    return f"{head.rstrip()}\n{TRUNCATED}\n{tail.lstrip()}"


def format_output(
    stdout: str,
    stderr: str = "",
    error: str | None = None,
    ok: bool = True,
    *,
    state_lost: bool = False,
    truncated: bool = False,
    limit: int = OUTPUT_LIMIT,
) -> str:
    """The content of an output block, from one sandbox run (see the module docstring)."""
    parts = [STATE_LOST_NOTE] if state_lost else []
    out = stdout.rstrip()
    if truncated:  # the sandbox kept only the start: show its whole lines, up to the cap, then one marker
        out = out[: limit - len(TRUNCATED) - 1]  # room for the marker, so clip leaves it alone
        out = out[: out.rindex("\n")] if "\n" in out else out  # the last line was cut mid-way
    if out:
        parts.append(out)
    if truncated:
        parts.append(TRUNCATED)
    if not ok:
        parts.append(trim_traceback(stderr, error))
    text = clip("\n".join(parts).strip("\n"), limit).replace("```", "'''")
    return text or NO_OUTPUT


def extract_final_answer(text: str) -> str | None:
    r"""The final answer of a turn: the last ``\boxed{...}`` outside code and output blocks."""
    answer = extract_boxed(prose(text))
    return answer.strip() if answer and answer.strip() else None


_VERDICT = re.compile(
    r"^[\s*#>_-]*verdict[\s*_]*:?[\s*_]*(dis)?agree\b[\s*_]*[:,.\-\u2013\u2014]?\s*(?P<reason>.*)$",
    re.IGNORECASE,
)


_BOXED_IN_REASON = re.compile(r"\\boxed\{[^{}]*\}")


@dataclass
class Verdict:
    """A critic's verdict: ``kind`` is "agree", "disagree" or "none"; ``reason`` one line or ""."""

    kind: str
    reason: str = ""


def parse_verdict(text: str) -> Verdict:
    """The last ``VERDICT: AGREE`` / ``VERDICT: DISAGREE: reason`` line outside code and output blocks."""
    for line in reversed(prose(text).splitlines()):
        found = _VERDICT.match(line.strip())
        if found:
            reason = _BOXED_IN_REASON.sub("", found.group("reason")).strip().strip("*_").strip()
            return Verdict(DISAGREE if found.group(1) else AGREE, reason)
    return Verdict(NO_VERDICT)
