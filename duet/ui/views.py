"""``duet config``, ``duet logs [show]`` and ``duet feedback export``: tables for people, JSON for programs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.text import Text

from duet.app.errors import UsageProblem
from duet.app.settings import clipboard_path, data_dir, history_path, load_settings, log_path
from duet.terminal import safe_text


def _console() -> Any:
    from duet.terminal import SafeConsole

    return SafeConsole(highlight=False, markup=False)  # questions and paths are printed as they are


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=True, default=str) + "\n")


def _shorten(text: str | None, width: int) -> str:
    line = " ".join((text or "").split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _local_time(stamp: str) -> str:
    """``2026-11-28T11:12:17+00:00`` as local ``11-28 12:12`` (month-day hour:minute)."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(stamp).astimezone().strftime("%m-%d %H:%M")
    except ValueError:
        return stamp[5:16]


# ---------------------------------------------------------------------------------------------- config


def show_config(as_json: bool = False, errors: list | None = None) -> int:
    """Every key's effective value and its source, then the files duet uses. With ``errors``, bad values are
    shown (source "invalid ...") and their errors appended there instead of raised."""
    settings = load_settings(errors=errors)
    paths = {"config_file": str(settings.config_file), "data_dir": str(data_dir()), "log_db": str(log_path()),
             "history": str(history_path()), "clipboard_file": str(clipboard_path())}
    if as_json:
        _print_json({"settings": {r["key"]: {"value": r["value"], "source": r["source"], "env": r["env"]}
                                  for r in settings.rows()},
                     "paths": paths, "warnings": settings.warnings})
        return 0
    from rich.table import Table

    console = _console()
    exists = "" if settings.config_file.is_file() else " (not created: all values are defaults or env)"
    console.print(f"config file: {settings.config_file}{exists}", style="bold")
    console.print("every key can also be set with DUET_<KEY> (e.g. DUET_MAX_ROUNDS=4); flags win over both",
                  style="dim")
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    rows = []
    for row in settings.rows():
        value = row["value"]
        shown = "(unset)" if value is None else json.dumps(value) if isinstance(value, str) \
            else str(value).lower() if isinstance(value, bool) else str(value)
        source = row["source"].split(" ")[0]  # "file /path" and "env DUET_X": the header says which
        rows.append((row["key"], shown, source, row["help"]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    room = console.width - sum(widths) - 9  # 4 columns: padding 2 each (none at the edges), 3 rules
    for name, width in zip(("key", "value", "source"), widths, strict=True):
        table.add_column(name, no_wrap=True, width=width)
    if room >= 12:
        table.add_column("meaning", no_wrap=True, style="dim", width=room)
    for key, shown, source, meaning in rows:
        cells = [key, shown, source] + ([_shorten(meaning, room)] if room >= 12 else [])
        table.add_row(*map(Text, cells), style="" if source == "default" else "cyan")
    console.print(table)
    for name, path in paths.items():
        if name != "config_file":
            console.print(f"{name.replace('_', ' ')}: {path}", style="dim")
    for message in settings.warnings:
        console.print(f"warning: {message}", style="yellow")
    return 0


# ---------------------------------------------------------------------------------------------- logs


def _store() -> Any:
    """The log store, or None when nothing was ever logged (a corrupt file raises StoreError here)."""
    from duet.app.store import Store

    path = log_path()
    if not path.exists():
        return None
    store = Store(path)
    store.connect()
    return store


def list_logs(search: str | None = None, limit: int = 20, as_json: bool = False) -> int:
    """The latest exchanges, newest first."""
    if limit < 0:
        raise UsageProblem("--limit must be 0 or more")
    store = _store()
    rows = store.list(search, limit) if store is not None else []
    if as_json:
        _print_json(rows)
        return 0
    console = _console()
    if not rows:
        where = f" matching {search!r}" if search else ""
        console.print(f"no exchanges{where} in {log_path()}", style="dim")
        return 0
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    cells = []
    for r in rows:
        cells.append([str(r["id"]), _local_time(r["time"]), r["command"], r["stop_reason"],
                      r["rating"] or "", r["question"], r["answer"] if r["answer"] is not None else "-"])
    names = ("id", "time", "cmd", "stop", "rated", "question", "answer")
    widths = [max(len(names[i]), *(len(c[i]) for c in cells)) for i in range(5)]
    answer = min(20, max(len(names[6]), *(len(_shorten(c[6], 20)) for c in cells)))
    room = max(12, console.width - sum(widths) - answer - 3 * len(names) + 3)  # padding 2 per column, rules
    for name, width in zip(names, [*widths, room, answer], strict=True):
        table.add_column(name, no_wrap=True, width=width)
    styles = {"good": "green", "bad": "red"}
    for c in cells:
        c[5], c[6] = _shorten(c[5], room), _shorten(c[6], answer)
        table.add_row(*(Text(text, style=styles.get(text, "") if i == 4 else "") for i, text in enumerate(c)))
    console.print(table)
    return 0


def show_log(exchange_id: int, as_json: bool = False) -> int:
    """One exchange in full."""
    from duet.app.store import StoreError

    store = _store()
    if store is None:
        raise StoreError(f"no exchange {exchange_id}: nothing logged yet in {log_path()}")
    data = store.get(exchange_id)
    if as_json:
        _print_json(data)
        return 0
    from duet.agents.transcript import DialogueResult
    from duet.ui.export import result_markdown

    console = _console()
    head = (f"exchange #{data['id']} · {data['time']} · {data['command']} · model {data['model']}"
            + (f" · critic {data['critic_model']}" if data["critic_model"] else ""))
    try:
        text = result_markdown(DialogueResult.from_dict(data["transcript"]))
    except (ValueError, TypeError, KeyError):
        text = f"## Question\n\n{data['question']}\n\n**Answer:** {data['answer']}\n"
    if data.get("rating"):
        text += f"\n**Rating:** {data['rating']}" + (f": {data['comment']}" if data.get("comment") else "") + "\n"
    if console.is_terminal:
        from rich.markdown import Markdown

        console.print(head, style="bold")
        console.print(Markdown(text))
    else:
        sys.stdout.write(safe_text(head + "\n\n" + text))
    return 0


# ---------------------------------------------------------------------------------------------- feedback


def export_feedback(fmt: str = "jsonl", output: str | None = None, rating: str | None = None) -> int:
    """Every rated exchange, as JSON lines or CSV, to stdout or a file."""
    import csv

    from duet.app.store import EXPORT_COLUMNS

    if fmt not in ("jsonl", "csv"):
        raise UsageProblem(f"--format {fmt!r}: use jsonl or csv")
    if rating not in (None, "good", "bad"):
        raise UsageProblem(f"--rating {rating!r}: use good or bad")
    store = _store()

    def write(stream: Any) -> int:
        if store is not None:
            return store.export_feedback(stream, fmt, rating)
        if fmt == "csv":
            csv.writer(stream).writerow(EXPORT_COLUMNS)
        return 0

    if output is None:
        write(sys.stdout)
        return 0
    path = Path(output).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        count = write(f)
    print(f"wrote {count} rating{'s' if count != 1 else ''} to {path} ({fmt})", file=sys.stderr)
    return 0
