"""The SQLite exchange log and feedback store, and the transcript exports."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading

import pytest

from duet.agents.transcript import DialogueResult, Turn
from duet.app.store import SCHEMA_VERSION, Store, StoreError
from duet.ui.export import result_markdown, save_session


def result(question: str = "2+2?", answer: str | None = "4", agreed: bool = True) -> DialogueResult:
    solver = Turn("solver", 1, "solve", "scripted:r.json", [{"role": "user", "content": question}],
                  text=f"Add.\n```python\nprint(2+2)\n```\n```output\n4\n```\nSo \\boxed{{{answer}}}.", answer=answer,
                  completion_tokens=12)
    critic = Turn("critic", 1, "critique", "scripted:r.json", [], text="VERDICT: AGREE", verdict="agree")
    return DialogueResult(question, answer, agreed, 1, "agreed" if agreed else "max_rounds", [solver, critic],
                          solver_model="scripted:r.json", critic_model="scripted:r.json", completion_tokens=12,
                          seconds=0.5, config={"seed": 3, "temperature": 0.0})


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "data" / "logs.sqlite3")
    yield s
    s.close()


def test_log_list_get_round_trip(store):
    first = store.log_exchange(result("2+2?"), command="solve")
    second = store.log_exchange(result("What is 3*3?", "9"), command="repl", session="abc", parent_id=first)
    rows = store.list()
    assert [r["id"] for r in rows] == [second, first]
    assert rows[0]["question"] == "What is 3*3?" and rows[0]["agreed"] is True and rows[0]["rating"] is None
    full = store.get(second)
    assert (full["command"], full["session"], full["parent_id"], full["seed"]) == ("repl", "abc", first, 3)
    assert full["response"].endswith("So \\boxed{9}.")
    assert DialogueResult.from_dict(full["transcript"]).answer == "9"
    assert [r["id"] for r in store.list(limit=1)] == [second]
    with pytest.raises(StoreError, match="no exchange 99"):
        store.get(99)


def test_search_is_case_insensitive_and_literal(store):
    store.log_exchange(result("Apples and pears"), command="solve")
    store.log_exchange(result("100% of x_1", "x"), command="solve")
    assert [r["question"] for r in store.list("APPLES")] == ["Apples and pears"]
    assert [r["question"] for r in store.list("0% of x_")] == ["100% of x_1"]
    assert store.list("%") and not store.list("nothing like this")


def test_ratings_replace_and_export(store):
    a = store.log_exchange(result("a?"), command="repl")
    b = store.log_exchange(result("b?", "5", agreed=False), command="repl")
    store.rate(a, "good")
    store.rate(b, "good")
    store.rate(b, "bad", "wrong units")  # a second rating replaces the first
    ratings = {r["id"]: (r["rating"], r["comment"]) for r in store.list()}
    assert ratings == {a: ("good", None), b: ("bad", "wrong units")}
    out = io.StringIO()
    assert store.export_feedback(out, "jsonl") == 2
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert {line["exchange_id"]: line["rating"] for line in lines} == {a: "good", b: "bad"}
    bad = next(line for line in lines if line["rating"] == "bad")
    assert (bad["question"], bad["model"], bad["comment"]) == ("b?", "scripted:r.json", "wrong units")
    assert bad["response"].endswith("\\boxed{5}.") and bad["transcript"]["version"] == 1 and bad["rated_at"]
    out = io.StringIO()
    assert store.export_feedback(out, "csv", rating="good") == 1
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [(r["exchange_id"], r["rating"], r["question"]) for r in rows] == [(str(a), "good", "a?")]
    with pytest.raises(StoreError, match="good or bad"):
        store.rate(a, "meh")
    with pytest.raises(StoreError, match="no exchange 42"):
        store.rate(42, "good")


def test_schema_version_and_wal(store):
    store.log_exchange(result(), command="solve")
    conn = sqlite3.connect(store.path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_concurrent_writers(tmp_path):
    path = tmp_path / "logs.sqlite3"
    errors: list[BaseException] = []

    def write(n: int) -> None:
        s = Store(path)
        try:
            for i in range(10):
                s.log_exchange(result(f"q{n}-{i}"), command="solve")
        except BaseException as error:  # reported below
            errors.append(error)
        finally:
            s.close()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(Store(path).list(limit=100)) == 40


def test_corrupt_and_newer_databases_are_one_line_errors(tmp_path):
    bad = tmp_path / "logs.sqlite3"
    bad.write_bytes(b"this is not a database, just text " * 100)
    with pytest.raises(StoreError) as info:
        Store(bad).list()
    assert str(bad) in str(info.value) and "--no-log" in str(info.value) and "\n" not in str(info.value)
    newer = tmp_path / "newer.sqlite3"
    Store(newer).log_exchange(result(), command="solve")
    conn = sqlite3.connect(newer)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer duet"):
        Store(newer).list()


def test_markdown_and_json_session_exports(tmp_path):
    md = result_markdown(result("Two\nlines?"))
    assert "> Two\n> lines?" in md and "```python\nprint(2+2)\n```" in md and "**Verdict:** agree" in md
    assert "**Answer:** 4" in md
    cut = result()
    cut.turns[0].text = "Start.\n```python\nprint(1"  # a block cut off by the token limit
    assert result_markdown(cut).count("```") % 2 == 0
    assert save_session(tmp_path / "s.md", [result(), result("b?", "5")], "t") == "Markdown"
    assert save_session(tmp_path / "s.json", [result(), result("b?", "5")], "t") == "JSON"
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["kind"] == "duet.session" and [e["answer"] for e in data["exchanges"]] == ["4", "5"]
    assert DialogueResult.from_dict(data["exchanges"][1]).question == "b?"
