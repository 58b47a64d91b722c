"""The local exchange log and feedback store: one SQLite file (``$XDG_DATA_HOME/duet/logs.sqlite3``).

Schema (version 1, recorded in ``schema_version``)::

    exchanges(id INTEGER PRIMARY KEY, time TEXT (ISO 8601, UTC), command TEXT ("solve" | "repl"),
              session TEXT (a REPL session id), parent_id INTEGER (the exchange a /regen replaced),
              question TEXT, answer TEXT, response TEXT (the solver's final message), agreed INTEGER,
              rounds INTEGER, stop_reason TEXT, model TEXT, critic_model TEXT, seed INTEGER,
              temperature REAL, seconds REAL, tokens INTEGER (generated), transcript TEXT (the
              DialogueResult JSON, duet.agents.transcript))
    ratings(exchange_id INTEGER PRIMARY KEY REFERENCES exchanges(id), rating TEXT ("good" | "bad"),
            comment TEXT, time TEXT)

One rating per exchange: rating again replaces it. The database runs in WAL mode with a busy
timeout, so several duet processes can log at once. A file that is not a database, or one written by
a newer duet, raises StoreError with one line that names the path.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from duet.errors import DuetError

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS exchanges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    command TEXT NOT NULL,
    session TEXT,
    parent_id INTEGER,
    question TEXT NOT NULL,
    answer TEXT,
    response TEXT,
    agreed INTEGER NOT NULL,
    rounds INTEGER NOT NULL,
    stop_reason TEXT NOT NULL,
    model TEXT,
    critic_model TEXT,
    seed INTEGER,
    temperature REAL,
    seconds REAL,
    tokens INTEGER,
    transcript TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS exchanges_time ON exchanges(time);
CREATE TABLE IF NOT EXISTS ratings (
    exchange_id INTEGER PRIMARY KEY REFERENCES exchanges(id) ON DELETE CASCADE,
    rating TEXT NOT NULL CHECK (rating IN ('good', 'bad')),
    comment TEXT,
    time TEXT NOT NULL
);
"""

SUMMARY_COLUMNS = ("id", "time", "command", "question", "answer", "agreed", "rounds", "stop_reason", "model",
                   "critic_model", "seconds", "tokens", "rating", "comment")
EXPORT_COLUMNS = ("exchange_id", "rating", "comment", "rated_at", "time", "command", "question", "answer",
                  "response", "model", "critic_model", "agreed", "rounds", "stop_reason", "seed", "temperature")


class StoreError(DuetError):
    """The log database cannot be used (one line, with its path)."""


def now() -> str:
    """The current time, ISO 8601 in UTC with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Store:
    """The exchange log and the ratings. Opens (and creates) the database on first use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None

    # -- connection ----------------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        """The open connection (created, migrated and checked on the first call)."""
        if self._conn is not None:
            return self._conn
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"cannot open the log database {self.path}: {error}") from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 10000")
            self._initialise(conn)
        except sqlite3.DatabaseError as error:
            conn.close()
            raise StoreError(f"the log database {self.path} is unreadable ({error}); move it away "
                             "or run with --no-log") from None
        except StoreError:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _initialise(self, conn: sqlite3.Connection) -> None:
        """WAL mode, the schema and its version. Switching to WAL and creating the schema do not wait
        on busy_timeout when several processes open a new database at once: retry those for 10 s."""
        deadline = time.monotonic() + 10
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA foreign_keys = ON")
                if not self._has_schema(conn):
                    conn.executescript(SCHEMA)
                with conn:
                    version = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
                    if version is None:
                        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                    elif version > SCHEMA_VERSION:
                        raise StoreError(f"the log database {self.path} was written by a newer duet "
                                         f"(schema {version}; this duet reads {SCHEMA_VERSION})")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @staticmethod
    def _has_schema(conn: sqlite3.Connection) -> bool:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return {"schema_version", "exchanges", "ratings"} <= names

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self.connect()
        try:
            with conn:
                yield conn
        except sqlite3.DatabaseError as error:
            raise StoreError(f"log database {self.path}: {error}") from None

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- writing -------------------------------------------------------------------------------

    def log_exchange(self, result: Any, *, command: str, session: str | None = None,
                     parent_id: int | None = None) -> int:
        """Record one DialogueResult; returns its id."""
        solver_turns = [t for t in result.turns if t.agent == "solver"]
        config = result.config or {}
        row = {
            "time": now(), "command": command, "session": session, "parent_id": parent_id,
            "question": result.question, "answer": result.answer,
            "response": solver_turns[-1].text if solver_turns else "",
            "agreed": int(bool(result.agreed)), "rounds": result.rounds, "stop_reason": result.stop_reason,
            "model": result.solver_model, "critic_model": result.critic_model,
            "seed": config.get("seed"), "temperature": config.get("temperature"),
            "seconds": round(result.seconds, 3), "tokens": result.completion_tokens,
            "transcript": result.to_json(indent=None),
        }
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._tx() as conn:
            cursor = conn.execute(f"INSERT INTO exchanges ({columns}) VALUES ({marks})", tuple(row.values()))
            return int(cursor.lastrowid)

    def rate(self, exchange_id: int, rating: str, comment: str | None = None) -> None:
        """Save (or replace) the rating of an exchange: "good" or "bad", with an optional comment."""
        if rating not in ("good", "bad"):
            raise StoreError(f"a rating is good or bad, not {rating!r}")
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM exchanges WHERE id = ?", (exchange_id,)).fetchone() is None:
                raise StoreError(f"no exchange {exchange_id} in {self.path}")
            conn.execute(
                "INSERT INTO ratings (exchange_id, rating, comment, time) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(exchange_id) DO UPDATE SET rating = excluded.rating, comment = excluded.comment, "
                "time = excluded.time",
                (exchange_id, rating, comment or None, now()),
            )

    # -- reading -------------------------------------------------------------------------------

    def list(self, search: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """The latest exchanges (newest first), optionally those whose question, answer or response
        contains ``search`` (case-insensitive)."""
        where, params = "", []
        if search:
            pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where = ("WHERE e.question LIKE ? ESCAPE '\\' OR e.answer LIKE ? ESCAPE '\\' "
                     "OR e.response LIKE ? ESCAPE '\\'")
            params = [pattern] * 3
        sql = (f"SELECT e.id, e.time, e.command, e.question, e.answer, e.agreed, e.rounds, e.stop_reason, "
               f"e.model, e.critic_model, e.seconds, e.tokens, r.rating, r.comment FROM exchanges e "
               f"LEFT JOIN ratings r ON r.exchange_id = e.id {where} ORDER BY e.id DESC LIMIT ?")
        with self._tx() as conn:
            rows = conn.execute(sql, (*params, max(0, limit))).fetchall()
        return [_summary(r) for r in rows]

    def get(self, exchange_id: int) -> dict[str, Any]:
        """One exchange with everything: its row, the transcript (parsed) and its rating."""
        with self._tx() as conn:
            row = conn.execute(
                "SELECT e.*, r.rating, r.comment, r.time AS rated_at FROM exchanges e "
                "LEFT JOIN ratings r ON r.exchange_id = e.id WHERE e.id = ?", (exchange_id,)
            ).fetchone()
        if row is None:
            raise StoreError(f"no exchange {exchange_id} in {self.path}")
        data = dict(row)
        data["agreed"] = bool(data["agreed"])
        try:
            data["transcript"] = json.loads(data["transcript"])
        except ValueError:
            pass
        return data

    def ratings(self, rating: str | None = None) -> list[dict[str, Any]]:
        """Every rated exchange (oldest first) with the columns of :data:`EXPORT_COLUMNS` and its transcript."""
        where = "WHERE r.rating = ?" if rating else ""
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT r.exchange_id, r.rating, r.comment, r.time AS rated_at, e.time, e.command, e.question, "
                "e.answer, e.response, e.model, e.critic_model, e.agreed, e.rounds, e.stop_reason, e.seed, "
                f"e.temperature, e.transcript FROM ratings r JOIN exchanges e ON e.id = r.exchange_id {where} "
                "ORDER BY r.time, r.exchange_id", (rating,) if rating else ()
            ).fetchall()
        out = []
        for row in rows:
            data = dict(row)
            data["agreed"] = bool(data["agreed"])
            out.append(data)
        return out

    def export_feedback(self, stream: IO[str], fmt: str = "jsonl", rating: str | None = None) -> int:
        """Write the ratings as JSON lines (with the transcript) or CSV (without); returns the count."""
        rows = self.ratings(rating)
        if fmt == "csv":
            writer = csv.DictWriter(stream, fieldnames=EXPORT_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        elif fmt == "jsonl":
            for row in rows:
                try:
                    row["transcript"] = json.loads(row["transcript"])
                except ValueError:
                    pass
                stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            raise StoreError(f"unknown export format {fmt!r}; use jsonl or csv")
        return len(rows)


def _summary(row: sqlite3.Row) -> dict[str, Any]:
    data = {k: row[k] for k in SUMMARY_COLUMNS}
    data["agreed"] = bool(data["agreed"])
    return data

