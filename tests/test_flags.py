"""The settings' flags: declared once (duet.app.flags), taken by solve, repl and eval, and reaching the dialogue."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from duet.app.backends import dialogue_config
from duet.app.flags import EVAL_FLAGS, FLAGS, REPL_FLAGS, SOLVE_FLAGS, flag_help
from duet.app.settings import KEY_BY_NAME, load_settings
from duet.cli import app
from duet.errors import DuetError

VERIFIER = ["--no-verify", "--verify-threshold", "0.8", "--samples", "6", "--sample-temperature", "1.1"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    environment = {"DUET_CONFIG": str(tmp_path / "none.toml"), "HOME": str(tmp_path)}
    for name in [k for k in os.environ if k.startswith("DUET_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("DUET_CONFIG", environment["DUET_CONFIG"])
    return environment


def assert_verifier_settings(config) -> None:
    assert (config.verify, config.verify_threshold, config.samples, config.sample_temperature) == (False, 0.8, 6, 1.1)


def test_every_flag_is_a_setting_with_the_settings_help():
    assert set(FLAGS) <= set(KEY_BY_NAME)
    assert set(EVAL_FLAGS) < set(SOLVE_FLAGS) < set(REPL_FLAGS) == set(FLAGS)
    for name in ("verify", "verify_threshold", "samples", "sample_temperature"):
        assert name in EVAL_FLAGS
    assert flag_help(KEY_BY_NAME["samples"]).startswith("Alternatives the solver samples")
    assert flag_help(KEY_BY_NAME["verify_threshold"]).endswith("[default: 0.5].")
    helptext = CliRunner().invoke(app, ["solve", "--help"]).output
    assert "--verify / --no-verify" in helptext and "--sample-temperature T" in helptext


@pytest.mark.parametrize("command, target", [("solve", "duet.ui.solve.run_solve"), ("repl", "duet.ui.repl.run_repl")])
def test_solve_and_repl_pass_the_verifier_flags_to_the_dialogue(env, monkeypatch, command, target):
    seen = {}

    def capture(*args, flags, **kwargs):
        seen.update(flags)
        return 0

    monkeypatch.setattr(target, capture)
    args = [command, *VERIFIER, "--max-rounds", "2", "--no-log", *(["2+2?"] if command == "solve" else [])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["max_rounds"] == 2 and seen["log"] is False and seen["model"] is None  # None: not given
    config = dialogue_config(load_settings(seen, env))
    assert_verifier_settings(config)
    assert config.max_rounds == 2
    bad = CliRunner().invoke(app, [command, "--verify-threshold", "x"])
    assert bad.exit_code == 2


def test_eval_passes_the_verifier_flags_to_the_dialogue(env, monkeypatch, tmp_path):
    seen = []

    def capture(options, **kwargs):
        seen.append(options)
        raise DuetError("captured")

    monkeypatch.setattr("duet.evaluation.runner.run_eval", capture)
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n')
    replies = tmp_path / "r.json"
    replies.write_text('["\\\\boxed{2}"]')
    result = CliRunner().invoke(app, ["eval", str(data), "--replies", str(replies), *VERIFIER,
                                      "--sandbox-timeout", "3", "--seed", "5"])
    assert result.exit_code == 1 and "captured" in result.output
    (options,) = seen
    assert_verifier_settings(options.dialogue)
    assert options.dialogue.sandbox_timeout == 3 and options.seed == 5
