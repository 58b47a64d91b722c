"""Settings precedence (flag > DUET_* > config file > default), paths, and backend selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from duet.app.backends import backend_options, backend_specs, check_device, dialogue_config
from duet.app.settings import (
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
    ("env", "DUET_MAX_ROUNDS=0", "max_rounds must be an integer >= 1 (got 0)"),
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
    assert info.value.exit_code == 2  # a bad value is a usage error wherever it came from


def test_bad_flag_value_is_a_usage_error(env):
    with pytest.raises(SettingsError) as info:
        load_settings({"max_rounds": 0}, env)
    assert info.value.exit_code == 2 and "--max-rounds" in str(info.value)


@pytest.mark.parametrize(("where", "value", "message"), [
    ("flag", ("temperature", float("nan")), "--temperature: temperature must be a finite number >= 0 (got nan)"),
    ("flag", ("temperature", float("inf")), "--temperature: temperature must be a finite number >= 0 (got inf)"),
    ("flag", ("timeout", float("nan")), "--timeout: timeout must be a finite number from 0.1 to 86400 (got nan)"),
    ("flag", ("timeout", 1e12), "--timeout: timeout must be a finite number from 0.1 to 86400"),
    ("flag", ("seed", 10**23), "--seed: seed must be an integer from 0 to 9223372036854775807"),
    ("flag", ("device", "tpu"), "--device: 'tpu' is not valid for device: expected one of auto, cpu, cuda, cuda:N"),
    ("env", "DUET_TEMPERATURE=nan", "DUET_TEMPERATURE: temperature must be a finite number >= 0 (got nan)"),
    ("env", "DUET_REGEN_TEMPERATURE=-inf", "DUET_REGEN_TEMPERATURE: regen_temperature must be a finite number"),
    ("env", "DUET_SERVER_TIMEOUT=inf", "DUET_SERVER_TIMEOUT: server_timeout must be a finite number from 0.1"),
    ("env", "DUET_SEED=-1", "DUET_SEED: seed must be an integer from 0"),
    ("env", "DUET_DEVICE=cuda:x", "DUET_DEVICE: 'cuda:x' is not valid for device"),
    ("file", "temperature = nan", "config.toml: temperature: temperature must be a finite number >= 0 (got nan)"),
    ("file", "timeout = inf", "config.toml: timeout: timeout must be a finite number from 0.1 to 86400 (got inf)"),
])
def test_numbers_must_be_finite_and_in_range_wherever_they_come_from(env, where, value, message):
    flags = {}
    if where == "flag":
        flags = dict([value])
    elif where == "env":
        name, _, text = value.partition("=")
        env = {**env, name: text}
    else:
        write_config(env, value + "\n")
    with pytest.raises(SettingsError) as info:
        load_settings(flags, env)
    assert message in str(info.value) and info.value.exit_code == 2


def test_good_numbers_and_devices_pass(env):
    s = load_settings({"timeout": 86400, "seed": 2**63 - 1, "device": "cuda:3", "temperature": 2}, env)
    assert (s.timeout, s.seed, s.device, s.temperature) == (86400.0, 2**63 - 1, "cuda:3", 2.0)


def test_collected_errors_keep_every_bad_value_with_its_source(env):
    path = write_config(env, "max_rounds = -2\ntemperature = nan\nseed = 4\n")
    errors: list = []
    s = load_settings({}, {**env, "DUET_MAX_STEPS": "many"}, errors=errors)
    assert [str(e) for e in errors] == [
        f"{path}: max_rounds: max_rounds must be an integer >= 1 (got -2)",
        f"{path}: temperature: temperature must be a finite number >= 0 (got nan)",
        "DUET_MAX_STEPS: 'many' is not valid for max_steps: expected an integer"]
    assert (s.max_rounds, s.sources["max_rounds"]) == (-2, f"invalid file {path}")
    assert (s.temperature, s.max_steps, s.sources["max_steps"]) == ("nan", "many", "invalid env DUET_MAX_STEPS")
    assert (s.seed, s.sources["seed"]) == (4, f"file {path}")
    assert (s.where("seed"), s.where("max_steps"), s.where("critic")) == (f"{path}: seed", "DUET_MAX_STEPS",
                                                                           "--critic")
    with pytest.raises(SettingsError):  # without a list: the first bad value raises
        load_settings({}, env)


def test_an_unreadable_config_file_is_collected_too(env):
    path = write_config(env, "max_rounds = [\n")
    errors: list = []
    s = load_settings({}, env, errors=errors)
    assert len(errors) == 1 and f"{path}: not valid TOML" in str(errors[0]) and s.max_rounds == 3


def test_check_device():
    import torch

    assert check_device("cpu") == "cpu"
    assert check_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SettingsError, match="--device: 'tpu' is not valid for device") as info:
        check_device("tpu")
    assert info.value.exit_code == 2
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(SettingsError, match=f"DUET_DEVICE cuda:{count}: ") as info:
        check_device(f"cuda:{count}", "DUET_DEVICE")
    assert ("no CUDA device here" if count == 0 else f"there are {count} CUDA device(s)") in str(info.value)


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
    assert specs(env, replies="/r.json").solver == "scripted:/r.json"  # implied, like base_url implies openai
    both = specs(env, model="/a", critic_model="/b")
    assert (both.solver, both.critic) == ("local:/a", "local:/b")
    server = specs(env, base_url="http://h/v1", model_name="big", critic_model_name="small")
    assert (server.solver, server.critic) == ("openai:http://h/v1#big", "openai:http://h/v1#small")


@pytest.mark.parametrize(("flags", "message"), [
    ({"backend": "openai"}, "--backend openai needs --base-url URL"),
    ({"backend": "scripted"}, "--backend scripted needs --replies FILE"),
    ({"backend": "carrier-pigeon"}, "unknown backend 'carrier-pigeon'"),
    ({"backend": "openai", "base_url": "http://h/v1", "model": "/ckpt"}, "--model is a checkpoint directory"),
    ({"backend": "local", "replies": "/r.json"}, "--replies FILE is for the scripted backend, not --backend local"),
    ({"base_url": "http://h/v1", "replies": "/r.json"}, "--replies FILE is for the scripted backend, not --base-url"),
])
def test_backend_usage_errors(env, flags, message):
    replies = flags.pop("replies", None)
    with pytest.raises(SettingsError, match=message) as info:
        specs(env, replies, **flags)
    assert info.value.exit_code == 2


def test_replies_flag_wins_over_a_backend_from_the_environment_or_the_config_file(env):
    write_config(env, 'backend = "openai"\n')
    assert specs({**env, "DUET_BASE_URL": "http://h/v1"}, "/r.json").solver == "scripted:/r.json"


def test_backend_options_and_dialogue_config(env, tmp_path):
    s = load_settings({"device": "cpu", "dtype": "bf16", "mtp": False, "compile": True, "timeout": 2.5,
                       "memory": 256, "max_rounds": 2, "critic": False, "number_check": False}, env)
    assert backend_options("local:/x", s) == {"device": "cpu", "dtype": "bf16", "fp8_weights": "auto", "mtp": False,
                                              "compile": True}
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
    pytest.param({"compile": True}, "cuda", True, marks=pytest.mark.skipif(
        not __import__("torch").cuda.is_available(), reason="resolve_local checks that the device exists")),
])
def test_mtp_is_off_by_default_only_for_compiled_decoding_on_a_cpu(env, flags, device, mtp):
    from duet.app.backends import resolve_local

    options = backend_options("local:/x", load_settings({"device": device, **flags}, env))
    assert options["mtp"] == (flags.get("mtp", "auto"))
    assert resolve_local(options)["mtp"] is mtp
