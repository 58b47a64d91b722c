"""Settings precedence (flag > DUET_* > config file > default), paths, and backend selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from duet.ui.session import backend_options, backend_specs, dialogue_config
from duet.ui.settings import (
    KEYS,
    SettingsError,
    config_path,
    data_dir,
    load_settings,
    log_path,
    parse_flat_toml,
)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "XDG_DATA_HOME": str(tmp_path / "data")}


def write_config(env: dict[str, str], text: str) -> Path:
    path = config_path(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_paths_follow_xdg_and_fall_back_to_home(env):
    assert config_path(env) == Path(env["XDG_CONFIG_HOME"]) / "duet" / "config.toml"
    assert log_path(env) == Path(env["XDG_DATA_HOME"]) / "duet" / "logs.sqlite3"
    home_only = {"HOME": env["HOME"], "XDG_DATA_HOME": "relative/ignored"}
    assert config_path(home_only) == Path(env["HOME"]) / ".config" / "duet" / "config.toml"
    assert data_dir(home_only) == Path(env["HOME"]) / ".local" / "share" / "duet"
    assert config_path({**env, "DUET_CONFIG": "/etc/duet.toml"}) == Path("/etc/duet.toml")


def test_defaults_when_nothing_is_set(env):
    s = load_settings({}, env)
    assert all(s.sources[k.name] == "default" for k in KEYS)
    assert (s.max_rounds, s.critic, s.temperature, s.backend, s.model) == (3, True, 0.0, "local", None)


def test_precedence_flag_over_env_over_file_over_default(env):
    path = write_config(env, 'max_rounds = 5\ntemperature = 0.5\ncritic = false\nmodel = "~/m"\n')
    s = load_settings({"max_rounds": 7, "seed": None}, {**env, "DUET_TEMPERATURE": "0.25"})
    assert (s.max_rounds, s.sources["max_rounds"]) == (7, "flag")
    assert (s.temperature, s.sources["temperature"]) == (0.25, "env DUET_TEMPERATURE")
    assert (s.critic, s.sources["critic"]) == (False, f"file {path}")
    assert (s.seed, s.sources["seed"]) == (0, "default")  # None means "flag not given"
    assert s.model == "~/m"


def test_env_booleans_and_numbers(env):
    s = load_settings({}, {**env, "DUET_CRITIC": "off", "DUET_LOG": "0", "DUET_MTP": "yes", "DUET_MEMORY": "512"})
    assert (s.critic, s.log, s.mtp, s.memory) == (False, False, True, 512)


@pytest.mark.parametrize(("where", "value", "message"), [
    ("env", "DUET_MAX_ROUNDS=x", "DUET_MAX_ROUNDS: 'x' is not valid for max_rounds: expected an integer"),
    ("env", "DUET_CRITIC=maybe", "expected true or false"),
    ("env", "DUET_CLIPBOARD=paper", "expected one of auto, osc52, command, file"),
    ("env", "DUET_MAX_ROUNDS=0", "max_rounds must be at least 1"),
    ("file", 'max_rounds = "three"', "max_rounds: 'three' is not valid for max_rounds: expected an integer"),
    ("file", "critic = 1", "expected true or false"),
    ("file", "max_rounds = [", "not valid TOML"),
])
def test_bad_values_are_one_line_errors_naming_where(env, where, value, message):
    if where == "env":
        name, _, text = value.partition("=")
        env = {**env, name: text}
    else:
        write_config(env, value + "\n")
    with pytest.raises(SettingsError) as info:
        load_settings({}, env)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert info.value.exit_code == 1


def test_bad_flag_value_is_a_usage_error(env):
    with pytest.raises(SettingsError) as info:
        load_settings({"max_rounds": 0}, env)
    assert info.value.exit_code == 2 and "--max-rounds" in str(info.value)


def test_unknown_config_key_is_a_warning(env):
    write_config(env, "max_round = 4\n")
    s = load_settings({}, env)
    assert s.max_rounds == 3 and "unknown key 'max_round'" in s.warnings[0]


def test_flat_toml_reader_for_python_310():
    text = '# duet\nmodel = "~/a \\"b\\"" # comment\nname = \'lit\'\nn = 1_000\nt = 0.5\nflag = true\n'
    assert parse_flat_toml(text) == {"model": '~/a "b"', "name": "lit", "n": 1000, "t": 0.5, "flag": True}
    with pytest.raises(ValueError, match="line 1"):
        parse_flat_toml("[section]\n")


# ------------------------------------------------------------------------------------ backend selection


def specs(env, replies=None, **flags):
    return backend_specs(load_settings(flags, env), replies)


def test_backend_specs(env, tmp_path):
    assert specs(env).solver == "local:" and specs(env).critic is None
    assert specs(env, model="/ckpt").solver == "local:/ckpt"
    assert specs(env, model="~/ckpt").solver == f"local:{Path('~/ckpt').expanduser()}"
    s = specs(env, backend="openai", base_url="http://h:8000/v1", model_name="ds")
    assert s.solver == "openai:http://h:8000/v1#ds" and s.critic is None
    assert specs(env, base_url="http://h:8000/v1").solver == "openai:http://h:8000/v1"  # implied
    assert specs(env, backend="scripted:/r.json").solver == "scripted:/r.json"
    assert specs(env, backend="scripted", replies="/r.json").solver == "scripted:/r.json"
    both = specs(env, model="/a", critic_model="/b")
    assert (both.solver, both.critic) == ("local:/a", "local:/b")
    server = specs(env, base_url="http://h/v1", model_name="big", critic_model_name="small")
    assert (server.solver, server.critic) == ("openai:http://h/v1#big", "openai:http://h/v1#small")


@pytest.mark.parametrize(("flags", "message"), [
    ({"backend": "openai"}, "--backend openai needs --base-url URL"),
    ({"backend": "scripted"}, "--backend scripted needs --replies FILE"),
    ({"backend": "carrier-pigeon"}, "unknown backend 'carrier-pigeon'"),
    ({"backend": "openai", "base_url": "http://h/v1", "model": "/ckpt"}, "--model is a checkpoint directory"),
])
def test_backend_usage_errors(env, flags, message):
    with pytest.raises(SettingsError, match=message) as info:
        specs(env, **flags)
    assert info.value.exit_code == 2


def test_backend_options_and_dialogue_config(env, tmp_path):
    s = load_settings({"device": "cpu", "dtype": "bf16", "mtp": False, "compile": True, "timeout": 2.5,
                       "memory": 256, "max_rounds": 2, "critic": False, "number_check": False}, env)
    assert backend_options("local:/x", s) == {"device": "cpu", "dtype": "bf16", "mtp": False, "compile": True}
    assert backend_options("openai:http://h/v1", s) == {"timeout": 60.0}
    replies = tmp_path / "r.json"
    replies.write_text('{"replies": ["a"], "delay": 0.5}')
    assert backend_options(f"scripted:{replies}", s) == {"delay": 0.5}
    config = dialogue_config(s)
    assert (config.max_rounds, config.critic, config.sandbox_timeout, config.sandbox_memory_mb) == (2, False, 2.5, 256)
    assert config.number_check is False


@pytest.mark.parametrize("flags, device, mtp", [
    ({}, "cpu", True),
    ({"compile": True}, "cpu", False),  # compiled MTP decodes slower than compiled plain on a CPU
    ({"compile": True, "mtp": True}, "cpu", True),  # unless asked for
    ({"compile": True}, "cuda", True),
])
def test_mtp_is_off_by_default_only_for_compiled_decoding_on_a_cpu(env, flags, device, mtp):
    from duet.ui.session import resolve_local

    options = backend_options("local:/x", load_settings({"device": device, **flags}, env))
    assert options["mtp"] == (flags.get("mtp", "auto"))
    assert resolve_local(options)["mtp"] is mtp
