"""Transcripts for people and programs: Markdown and JSON of one exchange or a whole REPL session.

JSON of a session (``/save FILE.json``)::

    {"version": 1, "kind": "duet.session", "saved": "<ISO time>", "exchanges": [<DialogueResult JSON>, ...]}

where each exchange is ``DialogueResult.to_dict()`` (``duet.agents.transcript``, itself versioned).
Markdown (any other extension) has one section per exchange: the question, every turn's text (its
code and output blocks are Markdown code fences), the critic's verdicts and the answer line.
"""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from duet.ui.render import TASK_LABEL, summary_line

SESSION_VERSION = 1
_FENCE = re.compile(r"^[ \t]*```", re.MULTILINE)


def result_markdown(result: Any, heading: str = "##") -> str:
    """One exchange as Markdown."""
    quoted = "\n".join("> " + line if line else ">" for line in result.question.splitlines()) or ">"
    parts = [f"{heading} Question\n\n{quoted}\n"]
    for turn in result.turns:
        task = TASK_LABEL.get(turn.task, turn.task)
        text = turn.text.rstrip()
        if len(_FENCE.findall(text)) % 2:  # a block cut off mid-way: close it so the rest still renders
            text += "\n```"
        header = f"{heading}# {turn.agent} · round {turn.round} · {task}"
        parts.append(f"{header}\n\n*{turn.model}*\n\n{text or '(no text)'}\n")
        if turn.agent == "critic" and turn.verdict:
            reason = f": {turn.reason}" if turn.reason and turn.verdict == "disagree" else ""
            parts.append(f"**Verdict:** {turn.verdict}{reason}\n")
        if turn.error:
            parts.append(f"*{turn.error}*\n")
    answer = result.answer if result.answer is not None else "(no answer)"
    parts.append(f"**Answer:** {answer}\n\n*{summary_line(result)}*\n")
    if result.error:
        parts.append(f"*error: {result.error}*\n")
    return "\n".join(parts)


def session_markdown(results: Sequence[Any], title: str = "duet session") -> str:
    """A whole conversation as Markdown."""
    out = [f"# {title}\n"]
    for number, result in enumerate(results, 1):
        first = result.question.strip().splitlines()[0] if result.question.strip() else ""
        out.append(f"## {number}. {first[:80]}\n")
        out.append(result_markdown(result, heading="###"))
    return "\n".join(out)


def session_json(results: Sequence[Any], saved: str) -> str:
    """A whole conversation as JSON (see the module docstring)."""
    data = {"version": SESSION_VERSION, "kind": "duet.session", "saved": saved,
            "exchanges": [r.to_dict() for r in results]}
    return json.dumps(data, indent=2, ensure_ascii=False, default=str)


def save_session(path: Path, results: Sequence[Any], saved: str) -> str:
    """Write the conversation to ``path``: JSON for ``.json``, Markdown otherwise; returns the format name."""
    if path.suffix.lower() == ".json":
        text, kind = session_json(results, saved), "JSON"
    else:
        text, kind = session_markdown(results), "Markdown"
    if not path.parent.is_dir():  # a mistyped directory is an error, not a new directory tree
        raise FileNotFoundError(errno.ENOENT, f"no such directory {path.parent}")
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return kind
