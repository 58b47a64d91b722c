"""``results.jsonl``: one JSON line per (problem, mode), crash-safe and never holding an item twice.

Writing: one writer appends each record as a single ``write`` of one whole line to a file opened with
``O_APPEND``, then flushes and ``fsync``\\ s it, under a lock. A ``kill -9`` can therefore leave at most one
torn line, and only at the end. Transcripts are written (and fsynced) to their own files *before* the
record that points at them, via a temporary file and an atomic rename.

Reading for a resume (:meth:`ResultsFile.open`): a last line without its newline is a torn record; it is cut
off (the file is truncated to the last complete line) and reported. A complete line that is not a JSON
object means the file was damaged by something else: that is an error naming the line, never silently
rewritten. A repeated (id, mode) keeps the first record. :func:`read_records` reads without changing
anything (for ``duet eval report`` on a run that may still be going).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duet.errors import DuetError

RECORD_KEYS = ("id", "mode", "question", "gold", "prediction", "correct", "agreed", "rounds", "stop_reason",
               "tokens", "seconds", "transcript")
"""The keys every record has, in this order (more may follow: error, first_prediction, votes, ...)."""


class ResultsError(DuetError):
    """results.jsonl is damaged in a way duet will not repair silently."""


@dataclass
class Loaded:
    """Records read from a results file, and what was wrong with it."""

    records: list[dict[str, Any]] = field(default_factory=list)
    torn_bytes: int = 0  # size of a torn last line (dropped)
    duplicates: int = 0  # repeated (id, mode) records (ignored)
    bad_lines: list[int] = field(default_factory=list)  # complete lines that are not records

    def keys(self) -> set[tuple[str, str]]:
        return {(r["id"], r["mode"]) for r in self.records}


def _parse(data: bytes, path: Path) -> Loaded:
    loaded = Loaded()
    end = data.rfind(b"\n") + 1
    loaded.torn_bytes = len(data) - end
    seen: set[tuple[str, str]] = set()
    for number, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            loaded.bad_lines.append(number)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("id"), str) or "mode" not in record:
            loaded.bad_lines.append(number)
            continue
        key = (record["id"], record["mode"])
        if key in seen:
            loaded.duplicates += 1
            continue
        seen.add(key)
        loaded.records.append(record)
    return loaded


def read_records(path: str | Path) -> Loaded:
    """Read ``path`` without changing it (a torn last line and bad lines are skipped and counted)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Loaded()
    except OSError as error:
        raise ResultsError(f"{path}: cannot read: {error.strerror or error}") from None
    return _parse(data, path)


class ResultsFile:
    """The append-only results file of a run directory (open it with :meth:`open`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None

    def open(self) -> Loaded:
        """Repair a torn last line, read the records, and open the file for appending."""
        loaded = read_records(self.path)
        if loaded.bad_lines:
            lines = ", ".join(map(str, loaded.bad_lines[:5]))
            raise ResultsError(
                f"{self.path}: line {lines} is not a valid record (the file was changed outside duet); "
                "move that line away or use a new --out"
            )
        if loaded.torn_bytes:
            size = self.path.stat().st_size
            with open(self.path, "r+b") as handle:
                handle.truncate(size - loaded.torn_bytes)
                handle.flush()
                os.fsync(handle.fileno())
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _fsync_dir(self.path.parent)
        return loaded

    def append(self, record: dict[str, Any]) -> None:
        """Append one record as one line, then flush and fsync (thread-safe)."""
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        with self._lock:
            if self._fd is None:
                raise RuntimeError("ResultsFile.append before open()")
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the file's content with ``records`` atomically (used by ``--retry-errors``)."""
        with self._lock:
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as handle:
                for record in records:
                    handle.write((json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def ordered(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with :data:`RECORD_KEYS` first, in order (missing ones as None), then the rest."""
    out = {key: record.get(key) for key in RECORD_KEYS}
    out.update((k, v) for k, v in record.items() if k not in out)
    return out


_UNSAFE = re.compile(r"[^A-Za-z0-9._+@=-]")


def safe_name(text: str, limit: int = 80) -> str:
    """A file-name-safe form of ``text`` (unsafe characters replaced; a short hash keeps it unique)."""
    clean = _UNSAFE.sub("_", text)[:limit].lstrip(".") or "_"
    if clean != text:
        import hashlib

        clean += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return clean


def transcript_path(mode: str, ident: str) -> str:
    """Where a transcript lives, relative to the run directory."""
    return f"transcripts/{safe_name(mode)}/{safe_name(ident)}.json"


def write_json_atomic(path: Path, data: Any, *, indent: int | None = None, sync: bool = True) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename (fsynced when ``sync``).

    On any failure (``path`` is a directory, a full disk, ...) the temporary file is removed and the error raised.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, ensure_ascii=False, indent=indent, default=str)
            handle.write("\n")
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
