"""duet eval end to end through the console script, on the scripted backend: data files the tests make
and the real ones in ../shared/data, resume, kill -9, errors, reports."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from duet.answers.numbers import numbers_as_digits
from tests.processes import default_sigint

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
KEYS = ("id", "mode", "question", "gold", "prediction", "correct", "agreed", "rounds", "stop_reason", "tokens",
        "seconds", "transcript")


def eval_command() -> list[str]:
    """`duet eval` through the installed console script once duet/cli.py mounts it, else the module."""
    from duet.cli import app

    script = Path(sys.executable).parent / "duet"
    if script.exists() and any(getattr(g, "name", None) == "eval" for g in app.registered_groups):
        return [str(script), "eval"]
    return [sys.executable, "-m", "duet.evaluation.cli"]


def clean_env() -> dict[str, str]:
    """No DUET_* variables and no config file: the flags alone decide."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUET_")}
    env["DUET_CONFIG"] = str(REPO / "tests" / "no-such-duet-config.toml")
    return env


def duet_eval(*args: object, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*eval_command(), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=clean_env())


def start_eval(*args: object, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([*eval_command(), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd, env=clean_env(), preexec_fn=default_sigint)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def scripted(path: Path, match: dict[str, str], replies: list[str] | None = None) -> Path:
    path.write_text(json.dumps({"replies": replies or [], "match": match}), encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


PROBLEMS = [
    ("Tom has 2 apples and buys 3 more. How many apples?", "2 + 3 = <<2+3=5>>5\n#### 5"),
    ("A box holds 6 rows of 7 pens. How many pens?", "#### 42"),
    ("Sam had 20 eggs and used 8. How many eggs are left?", "#### 12"),
    ("What is 10 minus 4 in the shop?", "#### 6"),
    ("Nobody scripted this question about kites?", "#### 1"),
]

MATCH = {
    # the solver's revision after the critic's reason (the revise message holds the reason, not the question)
    "recount the eggs": "Recount: 20 - 8 = 12.\n\\boxed{12}",
    # the critic (its message starts with "Problem:" and holds the question and the solution)
    "Problem:\nSam had 20 eggs": "Check.\nVERDICT: DISAGREE: recount the eggs\n\\boxed{12}",
    "Problem:\n": "Looks right.\nVERDICT: AGREE",
    # the solver's first turns
    "Tom has 2 apples": "Add them.\n```python\nprint(2 + 3)\n```\n```output\n5\n```\nSo \\boxed{5}.",
    "6 rows of 7 pens": "Multiply: \\boxed{42}",
    "Sam had 20 eggs": "Subtract: \\boxed{11}",
    "10 minus 4": "It is \\boxed{7}",
}


@pytest.fixture()
def small(tmp_path):
    rows: list[dict | str] = [{"question": q, "answer": a} for q, a in PROBLEMS[:2]]
    rows += ["{broken json", *({"question": q, "answer": a} for q, a in PROBLEMS[2:])]
    return jsonl(tmp_path / "small.jsonl", rows), scripted(tmp_path / "replies.json", MATCH)


def test_end_to_end_all_modes(small, tmp_path):
    data, replies = small
    run = tmp_path / "run"
    r = duet_eval(data, "--backend", f"scripted:{replies}", "--modes", "solver-only,solver+critic,no-code,sc@3",
                  "-o", run, "-j", "4")
    assert r.returncode == 0, r.stderr
    assert f"{data}:3: invalid JSON" in r.stderr and "skipped 1 malformed row(s) of 6" in r.stderr
    recs = records(run)
    assert sorted((x["id"], x["mode"]) for x in recs) == sorted(
        (i, m) for i in ("1", "2", "4", "5", "6") for m in ("solver-only", "solver+critic", "no-code",
                                                          "self-consistency@3"))
    for x in recs:
        assert list(x)[: len(KEYS)] == list(KEYS)
        assert json.loads((run / x["transcript"]).read_text())["id"] == x["id"]
    by = {(x["id"], x["mode"]): x for x in recs}
    # the critic bought one problem: the eggs were wrong in round 1 and right after the revision
    eggs = by[("4", "solver+critic")]
    assert (eggs["first_prediction"], eggs["prediction"], eggs["correct"], eggs["agreed"], eggs["rounds"]) == (
        "11", "12", True, True, 2)
    assert by[("4", "solver-only")]["prediction"] == "11" and not by[("4", "solver-only")]["correct"]
    assert by[("1", "solver-only")]["gold"] == "5" and by[("1", "solver-only")]["correct"]
    # the sandbox ran the apples code in the code modes, and refused it in no-code
    outputs = {m: json.loads((run / by[("1", m)]["transcript"]).read_text())["dialogues"][0]["turns"][0]["steps"]
               for m in ("solver-only", "no-code")}
    assert outputs["solver-only"][0]["output"] == "5"
    assert outputs["no-code"][0]["output"].startswith("code execution is disabled")
    # a problem the backend cannot answer is an error for that problem; the run went on
    kite = by[("6", "solver+critic")]
    assert kite["stop_reason"] == "backend_error" and "no scripted reply left" in kite["error"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["malformed"] == 1 and summary["data"]["usable"] == 5 and summary["records"] == 20
    sc, critic = summary["modes"]["self-consistency@3"], summary["modes"]["solver+critic"]
    assert summary["modes"]["solver-only"]["accuracy"] == 0.4 and critic["accuracy"] == 0.6
    assert critic["errors"] == 1 and critic["agreement_rate"] == 0.8
    assert critic["accuracy_agreed"]["accuracy"] == 0.75 and critic["round1"]["difference"]["fixed"] == 1
    assert sc["n"] == 5 and sc["agreement_rate"] is None
    assert by[("2", "self-consistency@3")]["votes"] == [{"answer": "42", "count": 3}]
    assert lo_hi(critic["ci95"]) and critic["tokens_per_second"] > 0 and critic["problems_per_minute"] > 0
    config = json.loads((run / "config.json").read_text())
    model = json.loads((run / "model.json").read_text())
    assert config["modes"] == ["solver-only", "solver+critic", "no-code", "self-consistency@3"]
    assert config["data"]["malformed"] == 1 and len(config["data"]["sha256"]) == 64
    assert model["solver"]["kind"] == "scripted" and len(model["solver"]["sha256"]) == 64
    assert config["versions"]["duet"] and "git" in config
    assert "What the critic bought" in r.stdout and "self-consistency@3" in r.stdout


def lo_hi(ci):
    return 0 <= ci[0] <= ci[1] <= 1


def test_resume_default_out_and_changed_options(small, tmp_path):
    data, replies = small
    base = (data, "--backend", f"scripted:{replies}", "--modes", "solver+critic")
    first = duet_eval(*base, "--limit", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (run,) = (tmp_path / "runs" / "eval").iterdir()
    assert run.name.startswith("small-") and len(records(run)) == 2
    again = duet_eval(*base, cwd=tmp_path)  # the same options: the same directory, the rest of the problems
    assert again.returncode == 0 and "resuming" in again.stderr and "2 of 5 already done" in again.stderr
    assert sorted(x["id"] for x in records(run)) == ["1", "2", "4", "5", "6"]
    assert duet_eval(*base, cwd=tmp_path).stdout.count("solver+critic") >= 1 and len(records(run)) == 5
    changed = duet_eval(*base, "--max-rounds", "2", "-o", run, cwd=tmp_path)
    assert changed.returncode == 1
    assert "dialogue.max_rounds: 3 -> 2" in changed.stderr and "new --out" in changed.stderr
    assert changed.stderr.strip().splitlines()[-1].startswith("error: ")
    other = duet_eval(*base, "--max-rounds", "2", "--limit", "1", cwd=tmp_path)  # default --out: a new directory
    assert other.returncode == 0 and len(list((tmp_path / "runs" / "eval").iterdir())) == 2
    scripted(replies, {**MATCH, "10 minus 4": "It is \\boxed{6}"})  # the "model" changed
    refused = duet_eval(*base, "-o", run, cwd=tmp_path)
    assert refused.returncode == 1 and "solver.sha256" in refused.stderr


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = path.read_bytes().count(b"\n") if path.exists() else 0
        if count >= n:
            return count
        if proc.poll() is not None:
            raise AssertionError(f"finished before {n} lines: {proc.stderr.read()}")
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_kill_9_mid_run_loses_nothing_but_items_in_flight(tmp_path):
    rows = [{"question": f"Problem {i}: what is {i} plus {i}?", "answer": f"#### {2 * i}"} for i in range(24)]
    data = jsonl(tmp_path / "many.jsonl", rows)
    replies = tmp_path / "r.json"  # "delay": seconds before each reply, read as by `duet solve`
    replies.write_text(json.dumps({"replies": ["Double it: \\boxed{0}"], "match": {"Problem:\n": "VERDICT: AGREE"},
                                   "delay": 0.05}))
    run = tmp_path / "run"
    args = (data, "--backend", f"scripted:{replies}", "--modes", "solver-only,solver+critic", "-o", run, "-j", "3",
            "--no-progress")
    proc = start_eval(*args)
    results = run / "results.jsonl"
    wait_for_lines(results, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    raw = results.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    killed = [json.loads(line) for line in complete.splitlines()]  # every complete line parses
    assert 6 <= len(killed) < 48 and len({(x["id"], x["mode"]) for x in killed}) == len(killed)
    # Ctrl-C: the problems in flight are abandoned (and say so), the file stays whole, exit status 130
    proc = start_eval(*args)
    wait_for_lines(results, len(killed) + 4, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert re.search(r"interrupted: abandoning \d+ problem\(s\) in flight; they run again on resume", err)
    assert "finishing" not in err
    assert "run the same command again to resume" in err
    interrupted = records(run)
    assert len(interrupted) < 48 and len({(x["id"], x["mode"]) for x in interrupted}) == len(interrupted)
    # a torn last line (a kill in the middle of a write) is dropped on resume
    with open(results, "ab") as handle:
        handle.write(b'{"id": "torn", "mode": "solver-on')
    final = duet_eval(*args)
    assert final.returncode == 0, final.stderr
    assert "dropped a torn last record" in final.stderr
    done = records(run)
    keys = [(x["id"], x["mode"]) for x in done]
    assert len(keys) == len(set(keys)) == 48
    assert set(keys) == {(str(i + 1), m) for i in range(24) for m in ("solver-only", "solver+critic")}
    assert done[: len(interrupted)] == interrupted  # nothing finished was rewritten


def test_retry_errors_runs_failed_problems_again(small, tmp_path):
    data, replies = small
    run = tmp_path / "run"
    # 5 problems, fewer than the first max(4, -j 8) results that stop a run early: it ends, all errors (exit 1)
    failing = duet_eval(data, "--backend", f"scripted:{replies}", "--modes", "solver-only", "-o", run,
                        "-O", "delay=1", "-O", "timeout=0.01")
    assert failing.returncode == 1, failing.stderr
    assert {x["stop_reason"] for x in records(run)} == {"backend_error"}
    last = failing.stderr.strip().splitlines()[-1]
    assert last.startswith("error: every result (5) ended in an error, e.g. ") and "no reply within" in last
    assert last.endswith("-O delay=1 -O timeout=0.01 --retry-errors") and "solver-only" in failing.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["modes"]["solver-only"]["errors"] == 5 and summary["modes"]["solver-only"]["accuracy"] == 0
    plain = duet_eval(data, "--backend", f"scripted:{replies}", "--modes", "solver-only", "-o", run)
    assert plain.returncode == 1 and "5 of 5 already done" in plain.stderr  # timeouts are not answer-affecting
    retry = duet_eval(data, "--backend", f"scripted:{replies}", "--modes", "solver-only", "-o", run, "--retry-errors")
    assert retry.returncode == 0 and "5 failed record(s) will run again" in retry.stderr
    recs = records(run)
    assert len(recs) == 5 and sum(x["correct"] for x in recs) == 2
    assert [x["stop_reason"] for x in recs].count("backend_error") == 1  # the unscripted question
    # some errors: one line says how many and how to run them again
    assert retry.stderr.strip().splitlines()[-1] == (
        f"warning: 1 of 5 result(s) ended in an error (backend, sandbox or duet eval); run them again with "
        f"duet eval {data} --backend scripted:{replies} --modes solver-only -o {run} --retry-errors")


def test_malformed_rows_strict_empty_and_missing(tmp_path):
    data = jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "answer": "#### 1"}, '["x"]', {"question": "Q2?"}])
    replies = scripted(tmp_path / "r.json", {}, ["\\boxed{1}"])
    run = tmp_path / "run"
    strict = duet_eval(data, "--backend", f"scripted:{replies}", "--modes", "solver-only", "-o", run, "--strict")
    assert strict.returncode == 1 and not run.exists()
    assert re.search(r"2 malformed row\(s\) of 3, stopping \(--strict\): .*d\.jsonl:2: expected a JSON object",
                     strict.stderr)
    (tmp_path / "e.jsonl").write_text("")
    empty = duet_eval(tmp_path / "e.jsonl", "-o", run)
    assert empty.returncode == 1 and "the file is empty" in empty.stderr and not run.exists()
    none = duet_eval(jsonl(tmp_path / "n.jsonl", ['{"q": 1}']), "-o", run, "--backend", f"scripted:{replies}")
    assert none.returncode == 1 and "no usable rows" in none.stderr
    missing = duet_eval(tmp_path / "nope.csv", "--backend", f"scripted:{replies}", cwd=tmp_path)
    assert missing.returncode == 1 and "nope.csv: no such file" in missing.stderr
    bad_backend = duet_eval(data, "--backend", "nope:x", cwd=tmp_path)
    assert bad_backend.returncode == 1 and "unknown backend" in bad_backend.stderr
    for args, message in ((("--modes", "bogus"), "unknown mode"), (("--shard", "3/2"), "--shard"),
                          (("-O", "novalue"), "KEY=VALUE")):
        r = duet_eval(data, "--backend", f"scripted:{replies}", *args, cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()


def test_json_array_and_csv_with_configurable_fields(tmp_path):
    svamp = tmp_path / "svamp.json"
    svamp.write_text(json.dumps([
        {"ID": "chal-1", "Body": "Each pack has 12 pencils.", "Question": "How many pencils in 3 packs?",
         "Answer": 36.0},
        {"ID": "chal-2", "Body": "A class has 20 pupils.", "Question": "How many pairs of pupils?", "Answer": 10.0},
    ], indent=2))
    table = tmp_path / "t.csv"
    table.write_text("uid,text,result\nk1,\"Half of 30, please?\",15\nk2,Double 4?,8\n")
    replies = scripted(tmp_path / "r.json", {"Each pack has 12 pencils. How many": "\\boxed{36}",
                                             "Half of 30": "\\boxed{15}", "Double 4": "\\boxed{9}"},
                       ["\\boxed{0}"])
    r = duet_eval(svamp, "--backend", f"scripted:{replies}", "--modes", "solver-only", "-o", tmp_path / "a",
                  "--id-field", "ID")
    assert r.returncode == 0, r.stderr
    assert sorted((x["id"], x["gold"], x["correct"]) for x in records(tmp_path / "a")) == [
        ("chal-1", "36", True), ("chal-2", "10", False)]
    r = duet_eval(table, "--backend", f"scripted:{replies}", "--modes", "solver-only", "-o", tmp_path / "b",
                  "--question-field", "text", "--answer-field", "result", "--id-field", "uid")
    assert r.returncode == 0, r.stderr
    assert sorted((x["id"], x["correct"]) for x in records(tmp_path / "b")) == [("k1", True), ("k2", False)]


def test_report_side_by_side_with_flips(small, tmp_path):
    data, replies = small
    better = scripted(tmp_path / "better.json", {**MATCH, "10 minus 4": "It is \\boxed{6}",
                                                 "6 rows of 7 pens": "\\boxed{43}"})
    for name, spec in (("a", replies), ("b", better)):
        r = duet_eval(data, "--backend", f"scripted:{spec}", "--modes", "solver-only", "-o", tmp_path / name)
        assert r.returncode == 0, r.stderr
    out = tmp_path / "report.json"
    r = duet_eval("report", tmp_path / "a", tmp_path / "b", "--json", out)
    assert r.returncode == 0, r.stderr
    assert "a/solver-only" in r.stdout and "b/solver-only" in r.stdout and "Flipped" in r.stdout
    report = json.loads(out.read_text())
    (comparison,) = report["comparisons"]
    assert comparison["difference"]["paired"] and comparison["difference"]["n"] == 5
    assert sorted((f["id"], f["change"]) for f in comparison["flips"]) == [("2", "broken"), ("5", "fixed")]
    flip = next(f for f in comparison["flips"] if f["id"] == "5")
    assert (flip["a"], flip["b"], flip["gold"]) == ("7", "6", "6")
    bad = duet_eval("report", tmp_path / "a", "--baseline", "zzz")
    assert bad.returncode == 1 and "--baseline" in bad.stderr
    assert duet_eval("report", tmp_path / "nope").returncode == 1


def test_report_refuses_to_pair_runs_on_different_data(small, tmp_path):
    data, replies = small
    other = jsonl(tmp_path / "other.jsonl", [{"question": q, "answer": a} for q, a in reversed(PROBLEMS)])
    for name, path in (("a", data), ("b", other)):
        r = duet_eval(path, "--backend", f"scripted:{replies}", "--modes", "solver-only", "-o", tmp_path / name)
        assert r.returncode == 0, r.stderr
    # ids are line numbers: id "1" is the apples in a and the kites in b, so pairing them would be wrong
    refused = duet_eval("report", tmp_path / "a", tmp_path / "b")
    assert refused.returncode == 2 and refused.stdout == ""
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("error: a and b were run on different data files (small.jsonl sha256 ")
    assert "other.jsonl sha256 " in line and line.endswith("pass --unpaired to compare their accuracies only")
    out = tmp_path / "report.json"
    r = duet_eval("report", tmp_path / "a", tmp_path / "b", "--unpaired", "--json", out)
    assert r.returncode == 0, r.stderr
    assert "Flipped" not in r.stdout and "different data files, compared unpaired" in r.stdout
    row = next(line for line in r.stdout.splitlines() if "b/solver-only" in line and "pts" in line)
    assert row.rstrip(" │").endswith("no")
    (comparison,) = json.loads(out.read_text())["comparisons"]
    assert comparison["difference"]["paired"] is False and comparison["flips"] == []
    assert comparison["same_data"] is False
    merged = duet_eval("report", tmp_path / "a", tmp_path / "b", "--merge")
    assert merged.returncode == 2 and "--merge: the runs were made on different data files" in merged.stderr


def test_report_flips_show_a_dash_for_no_answer(small, tmp_path):
    data, replies = small
    wordy = scripted(tmp_path / "wordy.json", {**MATCH, "6 rows of 7 pens": "Many pens, I think."})
    for name, spec in (("a", replies), ("b", wordy)):
        r = duet_eval(data, "--backend", f"scripted:{spec}", "--modes", "solver-only", "-o", tmp_path / name)
        assert r.returncode == 0, r.stderr
    r = duet_eval("report", tmp_path / "a", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if "broken" in line and "pens" in line)
    assert "—" in row and "None" not in r.stdout


def test_broken_backend_stops_early_and_the_run_resumes(tmp_path):
    rows = [{"question": f"Problem {i}: what is {i} plus {i}?", "answer": f"#### {2 * i}"} for i in range(10)]
    data = jsonl(tmp_path / "ten.jsonl", rows)
    # nothing listens on port 9 (discard): every request is refused at once
    run = tmp_path / "down"
    r = duet_eval(data, "--base-url", "http://127.0.0.1:9/v1", "--modes", "solver-only", "-j", "2", "-o", run,
                  "--no-progress")
    assert r.returncode == 1 and r.stdout == ""
    last = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: cannot reach http://127\.0\.0\.1:9/v1: .*; every problem so far failed, "
                        r"stopping \(fix it and resume with duet eval .* --retry-errors\)", last), last
    recs = records(run)
    assert len(recs) == 4 and {x["stop_reason"] for x in recs} == {"backend_error"}  # max(4, -j 2) results
    # the same on a scripted backend that times out; then fixed, the run resumes and retries those
    replies = tmp_path / "r.json"
    replies.write_text(json.dumps({"replies": [], "match": {f"what is {i} plus": f"\\boxed{{{2 * i}}}"
                                                             for i in range(10)}}))
    run = tmp_path / "run"
    args = (data, "--backend", f"scripted:{replies}", "--modes", "solver-only", "-o", run, "-j", "5")
    r = duet_eval(*args, "-O", "delay=1", "-O", "timeout=0.01")
    assert r.returncode == 1 and "no reply within 0.01 s; every problem so far failed, stopping" in r.stderr
    assert len(records(run)) == 5  # max(4, -j 5); the problems in flight were abandoned
    resumed = duet_eval(*args, "--retry-errors")
    assert resumed.returncode == 0, resumed.stderr
    assert "5 failed record(s) will run again" in resumed.stderr and "ended in an error" not in resumed.stderr
    recs = records(run)
    assert len(recs) == 10 and all(x["correct"] for x in recs)


@pytest.mark.parametrize("args, message", [
    (("-j", "0"), "--concurrency 0: must be >= 1"),
    (("-n", "-3"), "--limit -3: must be >= 0"),
    (("--shard", "5/4"), "--shard 5/4"),
    (("--shard", "abc"), "expected i/n"),
    (("--modes", "foo"), "unknown mode 'foo'"),
    (("--modes", ","), "--modes is empty"),
    (("--token-budget", "0"), "--token-budget 0: must be >= 1"),
    (("--sc-temperature", "-1"), "--sc-temperature -1: must be a number >= 0"),
    (("--format", "xml"), "--format xml: unknown data format"),
    (("-O", "foo"), "expected KEY=VALUE"),
    (("-O", "bogus=1"), "--backend-option bogus: not an option of the scripted backend; use one of: delay, timeout"),
    (("-O", "timeout=abc"), "--backend-option timeout=abc: expected a number of seconds > 0"),
    (("--max-rounds", "0"), "--max-rounds"),
    (("--temperature", "-1"), "--temperature"),
    (("--sandbox", "bogus"), "--sandbox"),
])
def test_usage_errors_exit_2(tmp_path, args, message):
    data = jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "answer": "#### 1"}])
    replies = scripted(tmp_path / "r.json", {}, ["\\boxed{1}"])
    r = duet_eval(data, "--backend", f"scripted:{replies}", *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line, line
    assert not (tmp_path / "runs").exists()


def test_missing_data_or_run_is_a_usage_error():
    for args, name in ((("run",), "DATA"), (("report",), "RUN")):
        r = duet_eval(*args)
        assert r.returncode == 2 and "Missing argument" in r.stderr and name in r.stderr, r.stderr
        assert "Usage" not in r.stdout


def test_a_mistyped_subcommand_gets_a_hint(tmp_path):
    r = duet_eval("reprot", "runs/x", cwd=tmp_path)
    assert r.returncode == 2 and "did you mean 'duet eval report'?" in r.stderr, r.stderr
    (tmp_path / "reprot").write_text('{"question": "Q?", "answer": "#### 1"}\n')  # a data file of that name is data
    r = duet_eval("reprot", "--modes", "bogus", cwd=tmp_path)
    assert "did you mean" not in r.stderr and "bogus" in r.stderr, r.stderr


def test_backend_options_of_another_kind_are_refused(tmp_path):
    data = jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "answer": "#### 1"}])
    r = duet_eval(data, "--base-url", "http://127.0.0.1:9/v1", "-O", "max_batch=4", cwd=tmp_path)
    keys = "api_key, deadline, extra_body, retries, retry_seconds, timeout, tokenizer"
    assert r.returncode == 2 and f"not an option of the openai backend; use one of: {keys}" in r.stderr
    r = duet_eval(data, "--base-url", "http://127.0.0.1:9/v1", "-O", "extra_body=[1]", cwd=tmp_path)
    assert r.returncode == 2 and "expected a JSON object" in r.stderr


def test_out_is_a_file_and_report_json_is_a_directory(small, tmp_path):
    data, replies = small
    taken = tmp_path / "taken"
    taken.write_text("not a run")
    r = duet_eval(data, "--backend", f"scripted:{replies}", "--modes", "solver-only", "--out", taken)
    assert r.returncode == 2 and r.stderr.strip() == f"error: --out {taken}: exists and is not a run directory"
    assert taken.read_text() == "not a run"
    run = tmp_path / "run"
    assert duet_eval(data, "--backend", f"scripted:{replies}", "--modes", "solver-only", "-o", run).returncode == 0
    folder = tmp_path / "folder"
    folder.mkdir()
    r = duet_eval("report", run, "--json", folder)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: --json {folder}: is a directory; give a file name, e.g. {folder / 'report.json'}"]
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob(".*.tmp"))


def test_sandbox_option_is_named_as_in_solve(small, tmp_path):
    data, replies = small
    base = (data, "--backend", f"scripted:{replies}", "--modes", "solver-only", "--limit", "2")
    r = duet_eval(*base, "--sandbox", "none", "-o", tmp_path / "new")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "new" / "config.json").read_text())["dialogue"]["sandbox_isolation"] == "none"
    old = duet_eval(*base, "--sandbox-isolation", "rlimits", "-o", tmp_path / "old")  # the old name still works
    assert old.returncode == 0, old.stderr
    assert json.loads((tmp_path / "old" / "config.json").read_text())["dialogue"]["sandbox_isolation"] == "rlimits"
    helptext = duet_eval("run", "--help").stdout
    assert "--sandbox LEVEL" in helptext and "--sandbox-isolation" not in helptext


def test_help_and_no_torch_at_import():
    r = duet_eval("--help")
    assert r.returncode == 0 and "report" in r.stdout and "run" in r.stdout
    r = duet_eval("run", "--help")
    assert r.returncode == 0 and "--concurrency" in r.stdout and "--shard" in r.stdout
    code = "import sys, duet.evaluation.cli, duet.evaluation.runner; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


# ------------------------------------------------------------------------------------------ real data


def gsm8k_rows(n: int) -> list[dict]:
    path = SHARED_DATA / "gsm8k" / "train.jsonl"
    if not path.exists():
        pytest.skip(f"real GSM8K data not found at {path}")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


def test_real_gsm8k_sharded_then_merged(tmp_path):
    rows = gsm8k_rows(12)
    golds = [r["answer"].split("####")[-1].strip().replace(",", "") for r in rows]
    # right on even rows, wrong on odd rows; questions are matched by their opening words as the
    # dialogue asks them (numbers in words read as digits: "every hundred years" -> "every 100 years")
    match = {"Problem:\n": "VERDICT: AGREE"}
    for i, (row, gold) in enumerate(zip(rows, golds, strict=True)):
        match[numbers_as_digits(row["question"])[:60]] = f"\\boxed{{{gold if i % 2 == 0 else int(float(gold)) + 1}}}"
    replies = scripted(tmp_path / "r.json", match)
    data = SHARED_DATA / "gsm8k" / "train.jsonl"
    for shard in ("1/2", "2/2"):
        r = duet_eval(data, "--backend", f"scripted:{replies}", "--modes", "solver+critic", "--limit", 12,
                      "--shard", shard, "-o", tmp_path / shard.replace("/", "of"), "-j", "6")
        assert r.returncode == 0, r.stderr
    first, second = records(tmp_path / "1of2"), records(tmp_path / "2of2")
    assert len(first) == len(second) == 6 and not {x["id"] for x in first} & {x["id"] for x in second}
    assert all(x["gold"].replace(",", "") == golds[int(x["id"]) - 1] for x in first + second)
    out = tmp_path / "merged.json"
    r = duet_eval("report", tmp_path / "1of2", tmp_path / "2of2", "--merge", "--json", out)
    assert r.returncode == 0, r.stderr
    merged = json.loads(out.read_text())["systems"]["solver+critic"]
    assert merged["n"] == 12 and merged["accuracy"] == 0.5 and merged["agreement_rate"] == 1.0


def test_real_mawps_csv_masks_restored(tmp_path):
    path = SHARED_DATA / "mawps_asdiv_a" / "train.csv"
    if not path.exists():
        pytest.skip(f"real MAWPS/ASDiv-A data not found at {path}")
    with open(path, encoding="utf-8", newline="") as handle:
        rows = [row for _, row in zip(range(8), csv.DictReader(handle), strict=False)]

    def restore(row: dict) -> str:
        values = row["Numbers"].split()
        return re.sub(r"number(\d+)", lambda m: values[int(m.group(1))].removesuffix(".0"), row["Question"])

    match = {"Problem:\n": "VERDICT: AGREE"}
    for row in rows:
        match[restore(row)] = f"\\boxed{{{row['Answer']}}}"
    replies = scripted(tmp_path / "r.json", match)
    run = tmp_path / "run"
    r = duet_eval(path, "--backend", f"scripted:{replies}", "--modes", "solver-only", "--limit", 8, "-o", run,
                  "--strict")
    assert r.returncode == 0, r.stderr
    recs = records(run)
    assert len(recs) == 8 and all(x["correct"] for x in recs)
    assert not any("number0" in x["question"] for x in recs)
    assert any("56 books" in x["question"] and x["gold"] == "504" for x in recs)
