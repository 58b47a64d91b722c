"""duet eval, piece by piece: loaders, selection, results file, statistics, modes, summaries."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from duet.agents.backends import Completion, Request
from duet.agents.dialogue import DialogueConfig
from duet.errors import DuetError
from duet.evaluation.backend_options import options_for_backend, parse_backend_options
from duet.evaluation.datasets import DatasetError, Fields, Problem, Shard, load_dataset, restore_masks, select
from duet.evaluation.modes import NO_CODE_MESSAGE, Context, majority, parse_modes, run_problem
from duet.evaluation.report import compare, mode_stats, wall_seconds
from duet.evaluation.results import (
    RECORD_KEYS,
    ResultsError,
    ResultsFile,
    ordered,
    read_records,
    safe_name,
    write_json_atomic,
)
from duet.evaluation.stats import mcnemar_exact, paired_difference, unpaired_difference, wilson
from duet.prompts import load_prompts

# ------------------------------------------------------------------------------------------ datasets


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_gsm8k_style_with_malformed_rows_reported_by_line(tmp_path):
    data = write(tmp_path / "d.jsonl", "\n".join([
        json.dumps({"question": "Q1?", "answer": "work <<2*3=6>>\n#### 1,200"}),
        "",
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"question": "", "answer": "#### 3"}),
        json.dumps({"question": "Q6?"}),
        json.dumps({"question": "Q7?", "answer": "#### 7"}),
    ]))
    ds = load_dataset(data)
    assert [(p.id, p.question, p.gold) for p in ds.problems] == [("1", "Q1?", "1,200"), ("7", "Q7?", "7")]
    assert ds.rows == 6 and ds.format == "jsonl" and len(ds.sha256) == 64
    where = [(i.line, i.message.split(":")[0].split(" (")[0]) for i in ds.issues]
    assert where == [(3, "invalid JSON"), (4, "expected a JSON object, got an array"),
                     (5, "empty question in 'question'"), (6, "no answer field")]
    assert str(ds.issues[0]).startswith(f"{data}:3: invalid JSON")


def test_json_array_svamp_style_body_is_prepended_and_ids_from_field(tmp_path):
    rows = [
        {"ID": "chal-1", "Body": "Each pack has 12 pencils.", "Question": "How many in 3 packs?", "Answer": 36.0},
        {"ID": "chal-2", "Body": "A class has 20 pupils.", "Question": "How many pairs?", "Answer": 10},
        {"ID": "chal-3", "Body": "x", "Answer": 1},
        {"ID": "chal-1", "Body": "dup", "Question": "dup?", "Answer": 1},
    ]
    data = write(tmp_path / "svamp.json", json.dumps(rows, indent=1))
    ds = load_dataset(data, Fields(id="ID"))
    assert [(p.id, p.question, p.gold) for p in ds.problems] == [
        ("chal-1", "Each pack has 12 pencils. How many in 3 packs?", "36"),
        ("chal-2", "A class has 20 pupils. How many pairs?", "10"),
    ]
    assert [i.message for i in ds.issues][1] == "duplicate id 'chal-1' (first on line 2)"
    lines = [i.line for i in ds.issues]
    assert lines == [sorted(lines)[0], sorted(lines)[1]] and lines[0] > 2  # lines of the elements in the file
    # Without --id-field the id is the position in the array.
    assert [p.id for p in load_dataset(data).problems] == ["1", "2", "4"]


def test_json_array_issues_name_the_element(tmp_path):
    rows = [{"question": "Q1?", "answer": 1}, 5, {"question": "Q3?"}, {"question": "Q1?", "answer": 2, "id": "a"},
            {"question": "Q5?", "answer": 5, "id": "a"}]
    one_line = load_dataset(write(tmp_path / "one.json", json.dumps(rows)), Fields(id="id"))
    assert [str(i).removeprefix(str(tmp_path / "one.json")) for i in one_line.issues] == [
        ": element 1: no id in field 'id'", ": element 2: expected a JSON object, got a number",
        ": element 3: no answer field (looked for 'answer', 'Answer', 'solution', 'Solution')",
        ": element 5: duplicate id 'a' (first at element 4)"]
    spread = load_dataset(write(tmp_path / "spread.json", json.dumps(rows, indent=1)))
    assert [str(i).removeprefix(str(tmp_path / "spread.json")).split(": ")[0] for i in spread.issues] == [
        f":{spread.issues[0].line} (element 2)", f":{spread.issues[1].line} (element 3)"]
    assert spread.issues[0].line > 1
    jsonl = load_dataset(write(tmp_path / "d.jsonl", '{"question": "Q?", "answer": 1}\n[1]\n'))
    assert str(jsonl.issues[0]) == f"{tmp_path / 'd.jsonl'}:2: expected a JSON object, got an array"


def test_csv_mawps_style_masks_restored(tmp_path):
    data = write(tmp_path / "m.csv", (
        "Question,Numbers,Equation,Answer,Body,Ques\n"
        '"Bryan has number0 books in each of his number1 shelves . How many books ?",56.0 9.0,* number0 number1,'
        '504.0,"Bryan has number0 books in each of his number1 shelves .",How many books ?\n'
        '"A cake costs number0 dollars and number1 . How much ?",2.5,+ number0 number1,3.0,x,y\n'
        '"short row",1.0\n'
    ))
    ds = load_dataset(data)
    assert [(p.id, p.question, p.gold) for p in ds.problems] == [
        ("2", "Bryan has 56 books in each of his 9 shelves . How many books ?", "504")]
    assert [(i.line, i.message) for i in ds.issues] == [
        (3, "masked number1 but Numbers has 1 value(s)"), (4, "2 columns, the header has 6")]
    assert restore_masks("number10 and number1", " ".join(str(i) + ".0" for i in range(11))) == "10 and 1"


@pytest.mark.parametrize("content, message", [
    ("", "the file is empty"),
    ("  \n\n", "the file is empty"),
    ('{"q": 1}\n{"q": 2}\n', "no usable rows: all 2 are malformed"),
    ("[]", "no rows"),
    ('{"a": 1}', "expected a JSON array"),
])
def test_unusable_files_are_one_line_errors(tmp_path, content, message):
    name = "d.json" if content.startswith(("[", '{"a"')) else "d.jsonl"
    path = write(tmp_path / name, content)
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset(path, fmt="json" if content == '{"a": 1}' else None)
    assert "\n" not in str(info.value)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="--format"):
        load_dataset(write(tmp_path / "d.txt", "x"))
    assert "the rows have fields: q" in str(pytest.raises(DatasetError, load_dataset,
                                                          write(tmp_path / "e.jsonl", '{"q": 1}')).value)


def test_selection_shuffle_limit_shard():
    problems = [Problem(str(i), f"q{i}", "1", i) for i in range(1, 11)]
    first = select(problems, shuffle=True, seed=3, limit=4)
    assert [p.id for p in select(problems, shuffle=True, seed=3, limit=6)][:4] == [p.id for p in first]
    assert [p.id for p in first] != ["1", "2", "3", "4"]
    shards = [select(problems, limit=7, shard=Shard(i, 3)) for i in (1, 2, 3)]
    assert sorted(int(p.id) for s in shards for p in s) == list(range(1, 8))
    assert Shard.parse("2/4") == Shard(2, 4)
    for bad in ("0/4", "5/4", "x", "1/0"):
        with pytest.raises(DuetError):
            Shard.parse(bad)


# ------------------------------------------------------------------------------------------ results


def test_results_file_repairs_a_torn_last_line_and_refuses_damage(tmp_path):
    path = tmp_path / "results.jsonl"
    results = ResultsFile(path)
    results.open()
    for i in range(3):
        results.append({"id": str(i), "mode": "m", "x": "é" * i})
    results.close()
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"id": "3", "mo')  # a kill -9 in the middle of a write
    assert read_records(path).torn_bytes == 15 and path.read_bytes().endswith(b'"mo')  # reading changes nothing
    loaded = ResultsFile(path).open()
    assert [r["id"] for r in loaded.records] == ["0", "1", "2"] and loaded.torn_bytes == 15
    assert path.read_bytes() == whole
    path.write_bytes(whole + b"garbage\n" + whole)
    assert read_records(path).duplicates == 3
    with pytest.raises(ResultsError, match="line 4 is not a valid record"):
        ResultsFile(path).open()


def test_concurrent_appends_are_whole_lines(tmp_path):
    results = ResultsFile(tmp_path / "r.jsonl")
    results.open()
    threads = [threading.Thread(target=lambda t=t: [results.append({"id": f"{t}-{i}", "mode": "m", "pad": "x" * 5000})
                                                    for i in range(20)]) for t in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    loaded = read_records(tmp_path / "r.jsonl")
    assert len(loaded.records) == 80 and not loaded.bad_lines and not loaded.torn_bytes


def test_write_json_atomic_leaves_nothing_behind_on_failure(tmp_path):
    (tmp_path / "target").mkdir()
    with pytest.raises(IsADirectoryError):
        write_json_atomic(tmp_path / "target", {"x": 1}, sync=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_record_order_and_safe_names():
    assert list(ordered({"extra": 1, "mode": "m", "id": "1"}))[: len(RECORD_KEYS)] == list(RECORD_KEYS)
    assert safe_name("17") == "17" and safe_name("solver+critic") == "solver+critic"
    assert "/" not in safe_name("../../etc/passwd") and safe_name("a/b") != safe_name("a_b")


# ------------------------------------------------------------------------------------------ statistics


def test_wilson_interval_known_values():
    low, high = wilson(81, 263)  # Wilson's classic example
    assert round(low, 4) == 0.2553 and round(high, 4) == 0.3662
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0 and wilson(0, 0) is None


def table(both, fixed, broken, neither):
    """Paired outcomes (A, B) from a 2x2 table: B is Newcombe's first measurement, A the second."""
    a = [True] * both + [False] * fixed + [True] * broken + [False] * neither
    b = [True] * both + [True] * fixed + [False] * broken + [False] * neither
    return a, b


@pytest.mark.parametrize("cells, low, high", [
    ((36, 12, 2, 0), 0.0569, 0.3404),  # the four examples of Newcombe (1998), method 10
    ((18, 12, 2, 18), 0.0562, 0.3290),
    ((53, 0, 0, 1), -0.0729, 0.0729),
    ((0, 30, 0, 0), 0.8395, 1.0),
])
def test_paired_difference_matches_newcombe_1998(cells, low, high):
    both, fixed, broken, neither = cells
    d = paired_difference(*table(*cells))
    assert d.difference == pytest.approx((fixed - broken) / sum(cells))
    assert d.low == pytest.approx(low, abs=1e-4) and d.high == pytest.approx(high, abs=1e-4)
    assert d.fixed == fixed and d.broken == broken and d.paired


def test_paired_difference_properties_and_mcnemar():
    same = [True, False] * 10
    d = paired_difference(same, same)
    assert d.difference == 0 and d.low < 0 < d.high and d.p_value == 1.0
    assert paired_difference([], []) is None
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64) and mcnemar_exact(3, 3) == 1.0
    u = unpaired_difference(50, 100, 60, 100)
    assert u.difference == pytest.approx(0.1) and u.low < 0.1 < u.high and not u.paired
    flipped = paired_difference([True] * 5 + [False] * 5, [False] * 5 + [True] * 5)
    assert flipped.difference == 0 and flipped.fixed == flipped.broken == 5


# ------------------------------------------------------------------------------------------ modes


def test_parse_modes():
    assert [m.name for m in parse_modes("solver, critic ,no-code,sc@3")] == [
        "solver-only", "solver+critic", "no-code", "self-consistency@3"]
    assert parse_modes("self-consistency@5")[0].samples == 5
    for bad, message in (("nope", "unknown mode"), ("solver-only,solver", "twice"), ("", "empty"),
                         ("sc@0", "between 1 and 64")):
        with pytest.raises(DuetError, match=message):
            parse_modes(bad)


def test_majority_vote_groups_equivalent_answers():
    answer, votes = majority(["1/2", None, "3", "0.5", "3", "\\frac{1}{2}"])
    assert answer == "1/2" and [v["count"] for v in votes] == [3, 2]
    assert majority(["7", "8"])[0] == "7"  # a tie goes to the answer sampled first
    assert majority([None, None]) == (None, [])


class SeedBackend:
    """Answers by the sampling seed, and records what it was asked (thread-safe enough for one dialogue)."""

    name = "seeded"

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def complete(self, messages, request=Request(), *, on_text=None, cancel=None):
        seed, temperature = request.seed, request.temperature
        self.calls.append({"seed": seed, "temperature": temperature, "system": messages[0]["content"]})
        text = f"\\boxed{{{seed % 2}}}" if temperature > 0 else "```python\nprint(6*7)\n```\n```output"
        if "\\boxed" not in text and any(m["role"] == "assistant" for m in messages):
            text = "So \\boxed{42}"
        return Completion(text=text.removesuffix("```output"), finish_reason="stop" if "```output" in text else "eos",
                          stop_string="```output" if "```output" in text else None, completion_tokens=3)


def test_self_consistency_uses_distinct_seeds_and_votes():
    backend = SeedBackend()
    ctx = Context(solver=lambda: backend, critic=lambda: None, config=DialogueConfig(), prompts=load_prompts(),
                  seed=1, sc_temperature=0.9)
    record, transcript = run_problem(Problem("p1", "What is 6 times 7?", "1", 1), parse_modes("sc@5")[0], ctx)
    seeds = [c["seed"] for c in backend.calls]
    assert len(set(seeds)) == 5 and {c["temperature"] for c in backend.calls} == {0.9}
    expected = max(("0", "1"), key=lambda v: [str(s % 2) for s in seeds].count(v))
    assert record["prediction"] == expected and record["samples"] == [str(s % 2) for s in seeds]
    assert record["stop_reason"] == "majority_vote" and record["agreed"] is None
    assert sum(v["count"] for v in record["votes"]) == 5 and len(transcript["dialogues"]) == 5
    assert record["tokens"]["completion"] == 15
    again = SeedBackend()
    run_problem(Problem("p1", "x", "1", 1), parse_modes("sc@5")[0], Context(
        solver=lambda: again, critic=lambda: None, config=DialogueConfig(), prompts=load_prompts(), seed=1,
        sc_temperature=0.9))
    assert [c["seed"] for c in again.calls] == seeds  # reproducible (a resumed run samples the same)


def test_no_code_mode_runs_no_code_and_says_so():
    backend = SeedBackend()
    ctx = Context(solver=lambda: backend, critic=lambda: None, config=DialogueConfig(), prompts=load_prompts())
    record, transcript = run_problem(Problem("p", "What is 6 times 7?", "42", 1), parse_modes("no-code")[0], ctx)
    (turn,) = transcript["dialogues"][0]["turns"]
    assert turn["steps"][0]["output"] == NO_CODE_MESSAGE and not turn["steps"][0]["ok"]
    assert "No code will be run" in backend.calls[0]["system"]
    assert record["prediction"] == "42" and record["correct"] and record["stop_reason"] == "no_critic"
    record, transcript = run_problem(Problem("p", "What is 6 times 7?", "42", 1), parse_modes("solver")[0], ctx)
    assert transcript["dialogues"][0]["turns"][0]["steps"][0]["output"] == "42"  # the real sandbox ran it


# ------------------------------------------------------------------------------------------ summaries


def rec(ident, mode, correct, agreed=None, first=None, started=0.0, finished=1.0, stop="agreed"):
    r = {"id": ident, "mode": mode, "correct": correct, "agreed": agreed, "prediction": "1", "rounds": 1,
         "stop_reason": stop, "tokens": {"prompt": 10, "completion": 5}, "seconds": finished - started,
         "started": started, "finished": finished}
    if first is not None:
        r["first_correct"] = first
    return r


def test_mode_stats_conditional_accuracy_and_critic_gain():
    records = [rec("1", "c", True, True, True), rec("2", "c", True, False, False),
               rec("3", "c", False, False, True, stop="backend_error"), rec("4", "c", False, True, False)]
    s = mode_stats(records)
    assert s["n"] == 4 and s["accuracy"] == 0.5 and s["errors"] == 1 and s["agreement_rate"] == 0.5
    assert s["accuracy_agreed"]["accuracy"] == 0.5 and s["accuracy_not_agreed"]["n"] == 2
    assert s["round1"]["accuracy"] == 0.5 and s["round1"]["difference"]["fixed"] == 1
    assert s["completion_tokens"] == 20 and s["tokens_per_second"] == 20.0  # overlapping intervals: 1 s of wall
    assert mode_stats([rec("1", "s", True)])["agreement_rate"] is None


def test_wall_seconds_is_a_union_of_intervals():
    spans = [rec("1", "m", True, started=0, finished=2), rec("2", "m", True, started=1, finished=3),
             rec("3", "m", True, started=10, finished=11)]
    assert wall_seconds(spans) == 4


def test_compare_pairs_by_id_and_lists_flips():
    a = [rec("1", "a", True), rec("2", "a", False), rec("3", "a", True)]
    b = [rec("3", "b", False), rec("2", "b", True), rec("9", "b", True)]
    result = compare(a, b)
    assert result["difference"]["n"] == 2 and result["difference"]["paired"]
    assert sorted((f["id"], f["change"]) for f in result["flips"]) == [("2", "fixed"), ("3", "broken")]
    unpaired = compare(a, b, paired=False)  # runs on different data files: the same id is another problem
    assert not unpaired["difference"]["paired"] and unpaired["flips"] == []
    assert unpaired["difference"]["accuracy_a"] == pytest.approx(2 / 3)
    assert unpaired["difference"]["accuracy_b"] == pytest.approx(2 / 3)


def test_kind_field_is_reported_per_kind_with_paired_differences(tmp_path):
    path = write(tmp_path / "c.jsonl", "".join(json.dumps(r) + "\n" for r in [
        {"id": "a1", "kind": "inverse", "question": "q1", "answer": "#### 1"},
        {"id": "a2", "kind": "inverse", "question": "q2", "answer": "#### 2"},
        {"id": "b1", "kind": "compare", "question": "q3", "answer": "#### 3"},
        {"id": "c1", "question": "q4", "answer": "#### 4"}]))
    problems = load_dataset(path).problems
    assert [p.kind for p in problems] == ["inverse", "inverse", "compare", None]

    def recs(mode, right):
        return [{**rec(p.id, mode, ok), **({"kind": p.kind} if p.kind else {})}
                for p, ok in zip(problems, right, strict=True)]

    solver, critic = recs("s", [True, False, False, True]), recs("c", [True, True, True, True])
    stats = mode_stats(critic)["kinds"]
    assert stats["inverse"]["n"] == 2 and stats["inverse"]["accuracy"] == 1.0 and set(stats) == {"inverse", "compare"}
    kinds = compare(solver, critic)["kinds"]
    assert kinds["inverse"]["fixed"] == 1 and kinds["inverse"]["n"] == 2 and kinds["compare"]["fixed"] == 1


# ------------------------------------------------------------------------------------------ options


def test_backend_options_are_checked_per_backend_kind():
    assert parse_backend_options(["delay=0.5", "timeout=2"], ["scripted:r.json", None]) == {"delay": 0.5,
                                                                                          "timeout": 2}
    assert parse_backend_options(["api_key=123", "extra_body={\"top_p\": 0.9}"], ["openai:http://h/v1"]) == {
        "api_key": "123", "extra_body": {"top_p": 0.9}}
    assert parse_backend_options(["mtp=off", "max_batch=4", "device=cuda:1"], ["local:"]) == {
        "mtp": False, "max_batch": 4, "device": "cuda:1"}
    for items, message in ((["bogus=1"], "bogus: not an option of the scripted backend; use one of: delay, timeout"),
                           (["timeout=abc"], "timeout=abc: expected a number of seconds > 0"),
                           (["timeout=nan"], "expected a number of seconds"),
                           (["delay=-1"], "expected a number of seconds >= 0"),
                           (["novalue"], "expected KEY=VALUE")):
        with pytest.raises(DuetError, match=message) as info:
            parse_backend_options(items, ["scripted:r.json"])
        assert info.value.exit_code == 2
    with pytest.raises(DuetError, match="max_batch=0: expected a whole number >= 1"):
        parse_backend_options(["max_batch=0"], ["local:"])
    # solver and critic of different kinds: a key either takes is allowed, and goes only to the one that takes it
    both = parse_backend_options(["api_key=k", "delay=1"], ["scripted:r.json", "openai:http://h/v1"])
    assert options_for_backend("scripted:r.json", both) == {"delay": 1}
    assert options_for_backend("openai:http://h/v1", both) == {"api_key": "k"}


def test_a_backend_kinds_option_schema_is_read_by_make_backend_eval_and_settings(monkeypatch, tmp_path):
    """One dataclass per backend kind: adding an option there is all make_backend, -O and settings need."""
    from dataclasses import dataclass

    from duet.agents import backends
    from duet.agents.backends import BackendError, ScriptedBackend, make_backend, option, register_backend
    from duet.app.backends import backend_options
    from duet.app.settings import load_settings

    @dataclass(frozen=True)
    class EchoOptions:
        reply: str = option("text", "hi")
        patience: float = option("seconds", 1.0, setting="server_timeout")

    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))  # keep the registry clean
    register_backend("echo-test", lambda argument, reply="hi", patience=1.0: ScriptedBackend([reply]), EchoOptions)
    assert parse_backend_options(["reply=yo", "patience=2"], ["echo-test:x"]) == {"reply": "yo", "patience": 2}
    with pytest.raises(DuetError, match="bogus: not an option of the echo-test backend; use one of: patience, reply"):
        parse_backend_options(["bogus=1"], ["echo-test:x"])
    assert make_backend("echo-test:x", reply="yo").complete([{"role": "user", "content": "?"}]).text == "yo"
    with pytest.raises(BackendError, match="backend 'echo-test' has no option 'bogus'; use one of: patience, reply"):
        make_backend("echo-test:x", bogus=1)
    settings = load_settings({"server_timeout": 5}, {"DUET_CONFIG": str(tmp_path / "none.toml")})
    assert backend_options("echo-test:x", settings) == {"patience": 5}
    assert "reply" in parse_backend_options(["reply=a"])  # no specs: every registered kind's options


def test_usage_errors_have_exit_code_2():
    for bad in ("nope", ""):
        with pytest.raises(DuetError) as info:
            parse_modes(bad)
        assert info.value.exit_code == 2
    for bad in ("abc", "5/4"):
        with pytest.raises(DuetError) as info:
            Shard.parse(bad)
        assert info.value.exit_code == 2


def test_readme_lists_every_mode():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Evaluate on a dataset", 1)[1].split("\n### ", 1)[0]
    for name in ("solver-only", "solver+critic", "no-code", "no-code+critic", "self-consistency@K"):
        assert f"`{name}`" in section, name


def test_auroc_is_the_pairwise_ordering_probability():
    import random as _random

    from duet.agents.verifier import auroc
    from duet.evaluation.stats import calibration_bins

    rng = _random.Random(0)
    for _ in range(20):
        labels = [rng.random() < 0.4 for _ in range(30)]
        scores = [round(rng.random(), 1) for _ in range(30)]  # many ties
        if all(labels) or not any(labels):
            continue
        pos = [s for s, y in zip(scores, labels, strict=True) if y]
        neg = [s for s, y in zip(scores, labels, strict=True) if not y]
        brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))
        assert auroc(scores, labels) == pytest.approx(brute)
    assert auroc([0.1, 0.9], [False, True]) == 1.0 and auroc([0.5, 0.5], [True, False]) == 0.5
    assert auroc([0.3], [True]) is None
    bins = calibration_bins([0.05, 0.15, 0.95, 1.0], [False, True, True, True])
    assert [b["n"] for b in bins] == [1, 1, 2] and bins[-1]["accuracy"] == 1.0


def test_report_plots_are_written_as_png(tmp_path):
    from duet.evaluation.plots import write_plots

    records = [{"id": str(i), "mode": "solver+critic", "correct": i % 3 == 0, "first_correct": i % 2 == 0,
                "first_score": (i % 10) / 10, "kind": "inverse" if i % 2 else "compare"} for i in range(40)]
    paths = write_plots({"solver+critic": records}, tmp_path / "plots")
    assert [p.name for p in paths] == ["calibration.png", "accuracy.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
