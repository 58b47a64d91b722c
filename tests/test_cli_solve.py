"""`duet solve`, `config`, `logs`, `feedback export` and `doctor`, end to end through the installed console script.

The agents run on the scripted backend (replies files written here) and the real sandbox; one test runs
the real local runtime on a tiny random checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import default_sigint

DUET = Path(sys.executable).with_name("duet")
if not DUET.exists():  # pragma: no cover - an install without the console script next to python
    DUET = Path(shutil.which("duet") or "duet")

QUESTION = "A baker has 23 loaves and bakes 4 trays of 12 more. How many loaves does he have?"
SOLVE_WITH_CODE = (
    "Count the baked loaves.\n```python\nbaked = 4 * 12\nprint(baked)\n```\n```output\n(placeholder)\n```\n"
    "Add the 23.\n```python\nprint(23 + baked)\n```\n```output\n(placeholder)\n```\nHe has \\boxed{71} loaves."
)
SOLVE = "23 + 4 * 12 = 71, so he has \\boxed{71} loaves."
AGREE = "VERDICT: AGREE\n\\boxed{71}"
WRONG = "23 + 4 * 12 + 2 = 73, so \\boxed{73}."
DISAGREE = "VERDICT: DISAGREE: 23 + 48 is 71, not 73.\n\\boxed{71}"
RESULT_KEYS = {"version", "question", "answer", "agreed", "rounds", "stop_reason", "turns", "error", "solver_model",
               "critic_model", "prompt_tokens", "completion_tokens", "seconds", "config", "exit_code", "log_id"}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


def environment(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DUET_", "XDG_"))}
    env.update(HOME=str(home / "home"), XDG_CONFIG_HOME=str(home / "config"), XDG_DATA_HOME=str(home / "data"),
               TERM="xterm", COLUMNS="100", **extra)
    return env


def duet(home: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(DUET), *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                          env=env or environment(home), cwd=home)


def replies(home: Path, *items: str, name: str = "replies.json") -> str:
    path = home / name
    path.write_text(json.dumps(list(items)))
    return str(path)


def db(home: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(home / "data" / "duet" / "logs.sqlite3")
    conn.row_factory = sqlite3.Row
    return conn


# ------------------------------------------------------------------------------------------- solve


def test_human_output_on_a_pipe_is_plain_text_with_code_outputs_and_answer(home):
    r = duet(home, "solve", QUESTION, "--backend", f"scripted:{replies(home, SOLVE_WITH_CODE, AGREE)}")
    assert r.returncode == 0, r.stderr
    assert "\x1b[" not in r.stdout
    out = r.stdout
    assert "--- solver · round 1 · solving ---" in out and "--- critic · round 1 · checking ---" in out
    assert "```python\nbaked = 4 * 12\nprint(baked)\n```\n```output\n48\n```" in out  # real sandbox output
    assert "```output\n71\n```" in out and "verdict: agree" in out
    assert "answer: 71\nagreed: yes · 1 round · stop: agreed" in out
    assert r.stderr == ""
    row = db(home).execute("SELECT command, question, answer, agreed, stop_reason FROM exchanges").fetchone()
    assert tuple(row) == ("solve", QUESTION, "71", 1, "agreed")


def test_json_is_one_documented_object_and_nothing_else(home):
    r = duet(home, "solve", "--json", QUESTION, "--backend", f"scripted:{replies(home, WRONG, DISAGREE, SOLVE, AGREE)}")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)  # the whole of stdout is one JSON object
    assert RESULT_KEYS <= set(data)
    assert (data["answer"], data["agreed"], data["rounds"], data["stop_reason"]) == ("71", True, 2, "agreed")
    assert (data["exit_code"], data["log_id"], data["version"]) == (0, 1, 1)
    assert [(t["agent"], t["round"], t["task"]) for t in data["turns"]] == [
        ("solver", 1, "solve"), ("critic", 1, "critique"), ("solver", 2, "revise"), ("critic", 2, "critique")]
    assert data["turns"][1]["verdict"] == "disagree" and "not 73" in data["turns"][1]["reason"]
    assert r.stderr == ""


def test_the_number_check_shows_as_a_critic_turn_and_can_be_turned_off(home):
    miscopied = "Add them.\n```python\nprint(28 + 4 * 12)\n```\n```output\n(placeholder)\n```\nSo \\boxed{76}."
    r = duet(home, "solve", QUESTION, "--no-log", "--backend",
             f"scripted:{replies(home, miscopied, SOLVE_WITH_CODE, AGREE)}")
    assert r.returncode == 0, r.stderr
    assert "verdict: disagree" in r.stdout and "the code uses 28 (did you mean 23?)" in r.stdout
    assert "answer: 71\nagreed: yes · 2 rounds · stop: agreed" in r.stdout
    off = duet(home, "solve", "--json", QUESTION, "--no-log", "--no-number-check", "--backend",
               f"scripted:{replies(home, miscopied, AGREE, name='off.json')}")
    data = json.loads(off.stdout)
    assert [t["task"] for t in data["turns"]] == ["solve", "critique"] and data["config"]["number_check"] is False


def test_quiet_prints_only_the_answer_and_stdin_is_read(home):
    r = duet(home, "solve", "-q", "--backend", f"scripted:{replies(home, SOLVE, AGREE)}", stdin=QUESTION + "\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, "71\n", "")
    assert db(home).execute("SELECT question FROM exchanges").fetchone()[0] == QUESTION


def test_question_from_file_and_no_log(home):
    (home / "q.txt").write_text(QUESTION)
    r = duet(home, "solve", "--file", "q.txt", "-q", "--no-log", "--backend", f"scripted:{replies(home, SOLVE, AGREE)}")
    assert (r.returncode, r.stdout) == (0, "71\n"), r.stderr
    assert not (home / "data" / "duet" / "logs.sqlite3").exists()


def test_no_agreement_exits_3_and_solver_only_exits_0(home):
    r = duet(home, "solve", "--json", "--max-rounds", "1", QUESTION, "--backend",
             f"scripted:{replies(home, WRONG, DISAGREE)}")
    data = json.loads(r.stdout)
    assert (r.returncode, data["exit_code"], data["stop_reason"], data["answer"], data["agreed"]) == (
        3, 3, "max_rounds", "73", False)
    r = duet(home, "solve", "-q", "--no-critic", QUESTION, "--backend", f"scripted:{replies(home, SOLVE)}")
    assert (r.returncode, r.stdout) == (0, "71\n")
    r = duet(home, "solve", "--no-critic", QUESTION, "--backend", f"scripted:{replies(home, 'I am not sure.')}")
    assert r.returncode == 3 and "answer: (no answer)" in r.stdout and "stop: no_answer" in r.stdout


def test_config_file_and_env_defaults_apply_and_flags_win(home):
    (home / "config" / "duet").mkdir(parents=True)
    (home / "config" / "duet" / "config.toml").write_text("critic = false\nmax_rounds = 2\n")
    script = replies(home, SOLVE, AGREE)
    r = duet(home, "solve", "--json", QUESTION, "--backend", f"scripted:{script}")
    data = json.loads(r.stdout)
    assert (data["stop_reason"], data["critic_model"], data["config"]["max_rounds"]) == ("no_critic", None, 2)
    env = environment(home, DUET_CRITIC="1", DUET_BACKEND=f"scripted:{script}")
    data = json.loads(duet(home, "solve", "--json", QUESTION, env=env).stdout)
    assert data["stop_reason"] == "agreed"
    data = json.loads(duet(home, "solve", "--json", "--no-critic", QUESTION, env=env).stdout)
    assert data["stop_reason"] == "no_critic"


@pytest.mark.parametrize(("args", "code", "message"), [
    (["solve", "--bogus", "q"], 2, "error: No such option: --bogus"),
    (["solve", "--max-rounds", "0", "q", "--backend", "scripted:x"], 2, "error: --max-rounds: max_rounds must be"),
    (["solve", "--json", "--quiet", "q"], 2, "error: --json and --quiet do not go together"),
    (["solve", "--file", "missing.txt"], 2, "error: --file missing.txt: no such file"),
    (["solve", "q", "--backend", "openai"], 2, "error: --backend openai needs --base-url URL"),
    (["solve", "q", "--model", "no/such/dir"], 1, "no/such/dir: no such checkpoint directory"),
    (["solve", "q", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1"], 1,
     "error: cannot reach http://127.0.0.1:9/v1: connection refused"),
    (["solve", "q", "--backend", "scripted:nothing.json"], 1, "error: cannot read scripted replies nothing.json"),
    (["logs", "show", "5"], 1, "error: no exchange 5"),
])
def test_errors_are_one_line_with_an_exit_code(home, args, code, message):
    r = duet(home, *args, stdin="")
    assert r.returncode == code, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def config_file(home: Path, text: str) -> Path:
    path = home / "config" / "duet" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize(("args", "env", "config", "message"), [
    (["--temperature", "nan"], {}, "", "error: --temperature: temperature must be a finite number >= 0 (got nan)"),
    (["--timeout", "inf"], {}, "", "error: --timeout: timeout must be a finite number from 0.1 to 86400 (got inf)"),
    (["--seed", "99999999999999999999999"], {}, "", "error: --seed: seed must be an integer from 0 to 92233720368"),
    ([], {"DUET_TEMPERATURE": "inf"}, "", "error: DUET_TEMPERATURE: temperature must be a finite number >= 0"),
    ([], {}, "temperature = nan\n", "config.toml: temperature: temperature must be a finite number >= 0 (got nan)"),
    (["--device", "tpu"], {}, "", "error: --device: 'tpu' is not valid for device: expected one of auto, cpu, cuda"),
    (["--device", "cuda:99"], {}, "", "error: --device cuda:99: "),  # no CUDA here, or not 100 devices
])
def test_bad_settings_from_flags_env_and_config_exit_2(home, args, env, config, message):
    if config:
        config_file(home, config)
    r = duet(home, "solve", QUESTION, *args, env=environment(home, **env))  # the local backend
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_json_prints_one_object_even_when_the_command_fails_before_the_dialogue(home):
    for args, code, message in [
        (["--model", str(home / "none"), QUESTION], 1, f"{home / 'none'}: no such checkpoint directory"),
        (["--temperature", "nan", QUESTION], 2, "--temperature: temperature must be a finite number"),
        (["   "], 2, "the question is empty"),
        (["--bogus", QUESTION], 2, "No such option: --bogus"),
    ]:
        r = duet(home, "solve", "--json", *args)
        data = json.loads(r.stdout)  # exactly one object on stdout
        assert set(data) == RESULT_KEYS and r.returncode == code == data["exit_code"], (args, r.stderr)
        assert message in data["error"] and r.stderr == f"error: {data['error']}\n"
        assert (data["answer"], data["stop_reason"], data["turns"], data["log_id"]) == (None, None, [], None)
    assert data["question"] is None


def test_replies_implies_the_scripted_backend(home):
    script = replies(home, SOLVE, AGREE)
    r = duet(home, "solve", "-q", "--no-log", "--replies", script, QUESTION)
    assert (r.returncode, r.stdout) == (0, "71\n"), r.stderr
    r = duet(home, "solve", "-q", "--no-log", "--replies", script, "--base-url", "http://127.0.0.1:9/v1", QUESTION)
    assert r.returncode == 2 and "--replies FILE is for the scripted backend, not --base-url" in r.stderr


def test_an_unquoted_question_gets_a_hint(home):
    r = duet(home, "solve", "What", "is", "17", "times", "23?", "--no-log")
    assert r.returncode == 2
    assert r.stderr == "error: the question must be one argument: duet solve 'What is 17 times 23?'\n"


def test_a_model_from_the_config_file_says_where_it_came_from(home):
    path = config_file(home, f'model = "{home / "none"}"\n')
    r = duet(home, "solve", "--no-log", QUESTION)
    assert r.returncode == 1
    assert r.stderr == f"error: {home / 'none'}: no such checkpoint directory (model, from {path})\n"


def test_missing_question_on_a_terminal_is_a_usage_error(home):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(str(DUET), ["solve"], env=environment(home), encoding="utf-8", timeout=30)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2 and "no question: pass it as an argument" in child.before


def test_on_a_terminal_rich_rendering_and_ctrl_c_exits_130(home):
    pexpect = pytest.importorskip("pexpect")
    env = environment(home)
    script = replies(home, SOLVE_WITH_CODE, AGREE)
    child = pexpect.spawn(str(DUET), ["solve", QUESTION, "--backend", f"scripted:{script}"], env=env, encoding="utf-8",
                          timeout=30, dimensions=(40, 100))
    child.expect(pexpect.EOF)
    child.close()
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", child.before)
    assert child.exitstatus == 0
    assert "╭─ step 1 · python" in screen and "✔ the critic agrees" in screen
    assert re.search(r"│ 71 +│\n╰─ agreed: yes · 1 round · stop: agreed", screen), screen
    slow = home / "slow.json"
    slow.write_text(json.dumps({"replies": [SOLVE], "delay": 5}))
    child = pexpect.spawn(str(DUET), ["solve", QUESTION, "--backend", f"scripted:{slow}"], env=env, encoding="utf-8",
                          timeout=30, preexec_fn=default_sigint)
    child.expect("thinking")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and "interrupted" in child.before, child.before
    assert db(home).execute("SELECT stop_reason FROM exchanges ORDER BY id DESC").fetchone()[0] == "interrupted"


def test_unreachable_server_in_json_mode_still_prints_the_result(home):
    r = duet(home, "solve", "--json", "q", "--base-url", "http://127.0.0.1:9/v1")
    data = json.loads(r.stdout)
    assert (r.returncode, data["stop_reason"], data["exit_code"]) == (1, "backend_error", 1)
    assert r.stderr == "error: cannot reach http://127.0.0.1:9/v1: connection refused\n"


# ------------------------------------------------------------------------------------------- other commands


def test_config_shows_values_and_sources(home):
    (home / "config" / "duet").mkdir(parents=True)
    (home / "config" / "duet" / "config.toml").write_text("max_rounds = 4\n")
    env = environment(home, DUET_TEMPERATURE="0.3")
    data = json.loads(duet(home, "config", "--json", env=env).stdout)
    settings = data["settings"]
    assert settings["max_rounds"]["value"] == 4 and settings["max_rounds"]["source"].startswith("file ")
    assert settings["temperature"] == {"value": 0.3, "source": "env DUET_TEMPERATURE", "env": "DUET_TEMPERATURE"}
    assert settings["seed"]["source"] == "default"
    assert data["paths"]["log_db"] == str(home / "data" / "duet" / "logs.sqlite3")
    table = duet(home, "config", env=env).stdout
    assert "max_rounds" in table and "file" in table and "env" in table and "config.toml" in table


def test_config_shows_bad_values_marked_and_exits_2(home):
    path = config_file(home, "max_rounds = -2\nseed = 4\n")
    env = environment(home, DUET_TEMPERATURE="nan")
    r = duet(home, "config", env=env)
    assert r.returncode == 2
    assert re.search(r"max_rounds +\S -2 +\S invalid", r.stdout) and re.search(r"seed +\S 4 +\S file", r.stdout)
    assert r.stderr.splitlines() == [
        f"error: {path}: max_rounds: max_rounds must be an integer >= 1 (got -2)",
        "error: DUET_TEMPERATURE: temperature must be a finite number >= 0 (got nan)"]
    r = duet(home, "config", "--json", env=env)
    settings = json.loads(r.stdout)["settings"]  # valid JSON: the nan is shown as a string
    assert r.returncode == 2
    assert settings["max_rounds"] == {"value": -2, "source": f"invalid file {path}", "env": "DUET_MAX_ROUNDS"}
    temperature = settings["temperature"]
    assert (temperature["value"], temperature["source"]) == ("nan", "invalid env DUET_TEMPERATURE")


def test_logs_list_search_show_and_feedback_export(home):
    first = replies(home, SOLVE, AGREE)
    second = replies(home, "It is \\boxed{9}.", "VERDICT: AGREE \\boxed{9}", name="nine.json")
    assert duet(home, "solve", "-q", QUESTION, "--backend", f"scripted:{first}").returncode == 0
    assert duet(home, "solve", "-q", "--backend", f"scripted:{second}", "What is 3 squared?").returncode == 0
    listed = json.loads(duet(home, "logs", "--json").stdout)
    assert [(r["id"], r["answer"]) for r in listed] == [(2, "9"), (1, "71")]
    assert [r["id"] for r in json.loads(duet(home, "logs", "--json", "--search", "squared").stdout)] == [2]
    table = duet(home, "logs").stdout
    assert "What is 3 squared?" in table and "agreed" in table
    shown = duet(home, "logs", "show", "1").stdout
    assert "## Question" in shown and "\\boxed{71}" in shown and "**Answer:** 71" in shown
    assert json.loads(duet(home, "logs", "show", "2", "--json").stdout)["transcript"]["answer"] == "9"
    with db(home) as conn:
        conn.execute("INSERT INTO ratings VALUES (2, 'bad', 'too slow', '2026-01-01T00:00:00+00:00')")
    lines = duet(home, "feedback", "export").stdout.splitlines()
    assert [(json.loads(x)["exchange_id"], json.loads(x)["comment"]) for x in lines] == [(2, "too slow")]
    r = duet(home, "feedback", "export", "--format", "csv", "-o", "fb.csv")
    assert r.returncode == 0 and "wrote 1 rating to" in r.stderr
    assert (home / "fb.csv").read_text().splitlines()[0].startswith("exchange_id,rating,comment")


def test_corrupt_log_database(home):
    path = home / "data" / "duet" / "logs.sqlite3"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage " * 1000)
    r = duet(home, "logs")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and str(path) in r.stderr
    r = duet(home, "solve", "-q", QUESTION, "--backend", f"scripted:{replies(home, SOLVE, AGREE)}")
    assert r.returncode == 0 and r.stdout == "71\n" and r.stderr.startswith("warning: not logged:")


def test_doctor_reports_versions_sandbox_model_and_paths(home):
    r = duet(home, "doctor", "--json", env=environment(home, DUET_MODEL=str(home / "none"), DUET_SANDBOX="rlimits"))
    data = json.loads(r.stdout)
    names = {(c["section"], c["name"]) for c in data["checks"]}
    assert {("versions", "torch"), ("versions", "transformers"), ("device", "cuda"), ("device", "kernels"),
            ("sandbox", "rlimits"), ("paths", "config file"), ("paths", "log database")} <= names
    model = [c for c in data["checks"] if c["section"] == "model"]
    assert any(c["ok"] is False and "no such checkpoint directory" in c["detail"] for c in model)  # DUET_MODEL
    assert any(c["name"] == "model" and c["detail"] == f"{home / 'none'} (env DUET_MODEL)" for c in model)
    [setting] = [c for c in data["checks"] if (c["section"], c["name"]) == ("sandbox", "setting")]
    assert setting["detail"].startswith("rlimits (env DUET_SANDBOX): duet runs code at that level")
    assert r.returncode == (0 if data["ok"] else 1)


# ------------------------------------------------------------------------------------------- real runtime


@pytest.mark.slow
def test_solve_on_the_local_runtime_with_a_tiny_random_checkpoint(home):
    from tests.tiny_models import make_engine_checkpoint

    checkpoint = make_engine_checkpoint(home / "tiny", seed=2)
    r = duet(home, "solve", "--json", "--model", str(checkpoint), "--max-rounds", "1", "--max-tokens", "12",
             "--max-steps", "1", "--device", "cpu", "--critic-solves", "4", "What is 2 + 2?", timeout=180)
    data = json.loads(r.stdout)  # a random model writes garbage: the dialogue still ends cleanly
    assert r.returncode in (0, 3), r.stderr
    assert data["exit_code"] == r.returncode and data["solver_model"] == "local:tiny"
    assert data["stop_reason"] in ("no_answer", "max_rounds", "repeated_reply", "agreed")
    assert 0 < data["completion_tokens"] <= 12 * (2 + 4)  # solver, critic, the critic's 4 own solutions
    assert sum(t["task"] == "own_solution" for t in data["turns"]) == 4  # run beside the solver, recorded


def test_sandbox_level_is_a_setting_and_none_is_an_explicit_opt_out(home):
    reply = replies(home, SOLVE_WITH_CODE, AGREE)
    r = duet(home, "solve", "--json", "--sandbox", "none", QUESTION, "--backend", f"scripted:{reply}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["sandbox_isolation"] == "none"
    bad = duet(home, "solve", "--sandbox", "bogus", QUESTION, "--backend", f"scripted:{reply}")
    assert bad.returncode == 2 and "expected one of auto, bwrap, landlock, rlimits, none" in bad.stderr


def test_json_output_carries_no_raw_control_characters(home):
    """Model text reaches --json escaped: a terminal showing the JSON sees no ESC, BEL or C1 byte."""
    hostile = "Look\x1b]0;PWNED\x07 here\x9b2J. \\boxed{71}"
    r = duet(home, "solve", "--json", "--no-log", "--no-critic", "--replies", replies(home, hostile), QUESTION)
    assert not any(c in r.stdout for c in "\x1b\x07\x9b"), r.stdout
    assert json.loads(r.stdout)["turns"][0]["text"] == hostile  # nothing lost
