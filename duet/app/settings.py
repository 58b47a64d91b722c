"""Effective settings: command-line flag > ``DUET_*`` environment variable > config file > built-in default.

The config file is TOML with flat keys (``$XDG_CONFIG_HOME/duet/config.toml``, by default
``~/.config/duet/config.toml``; ``DUET_CONFIG`` points elsewhere)::

    model = "~/models/duet-small"     # solver checkpoint directory
    max_rounds = 4
    temperature = 0.2
    critic = true

Every key of :data:`KEYS` can also be set with ``DUET_<KEY>`` (``DUET_MAX_ROUNDS=4``, ``DUET_CRITIC=0``).
``duet config`` prints the effective value of every key and where it came from. Data (the exchange
log, REPL history, the clipboard fallback file) lives in ``$XDG_DATA_HOME/duet`` (``~/.local/share/duet``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duet.errors import DuetError


class SettingsError(DuetError):
    """A bad value in a flag, an environment variable or the config file (one line, naming where): a usage
    error, exit code 2, wherever the value came from."""

    exit_code = 2


@dataclass(frozen=True)
class Key:
    """One setting: its name, type ("str", "path", "int", "float", "bool"), default and meaning.

    ``choices``: the values a string may take ("N" in a choice stands for a number: "cuda:N");
    ``minimum``/``maximum``: the range of a number (a float must also be finite)."""

    name: str
    type: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    @property
    def env(self) -> str:
        """The environment variable that sets it."""
        return "DUET_" + self.name.upper()


DAY = 86400  # the longest time limit: larger ones overflow the clocks they are added to

KEYS: tuple[Key, ...] = (
    Key("model", "path", None, "solver checkpoint directory (unset: the embedded default model)"),
    Key("backend", "str", "local", "solver backend: local, openai, or scripted:FILE"),
    Key("base_url", "str", None, "OpenAI-compatible server URL (implies backend openai)"),
    Key("model_name", "str", None, "model name on that server (unset: the first model it lists)"),
    Key("critic_model", "path", None, "critic checkpoint directory (unset: the solver's model)"),
    Key("critic_backend", "str", None, "critic backend (unset: the solver's)"),
    Key("critic_base_url", "str", None, "critic's OpenAI-compatible server URL"),
    Key("critic_model_name", "str", None, "critic's model name on that server"),
    Key("critic", "bool", True, "run the critic (false: solver only)"),
    Key("number_check", "bool", True, "the critic rejects code numbers the problem never gives, before its model"),
    Key("numbers_as_digits", "bool", True, "the agents read numbers written in words and thousands separators as "
        "digits (nine -> 9, 1,200 -> 1200)"),
    Key("critic_solves", "int", 0, "times the critic solves the problem itself (sampled) before its number check "
        "and model (0: never)", minimum=0),
    Key("verify", "bool", True, "the critic scores the solver's answer with its verifier (P(correct)); below "
        "verify_threshold the solver samples alternatives and the answers vote, weighted by their scores "
        "(unset: on, except for scripted replies)"),
    Key("verify_threshold", "float", 0.5, "verifier score below which alternatives are sampled", minimum=0,
        maximum=1),
    Key("samples", "int", 4, "alternatives the solver samples when its answer scores low (0: none)", minimum=0),
    Key("sample_temperature", "float", 0.7, "temperature of those alternatives", minimum=0),
    Key("max_rounds", "int", 3, "solver turns the critic checks before giving up", minimum=1),
    Key("max_tokens", "int", 1024, "generated tokens per turn", minimum=1),
    Key("max_steps", "int", 8, "code cells per turn", minimum=1),
    Key("temperature", "float", 0.0, "sampling temperature (0: greedy)", minimum=0),
    Key("seed", "int", 0, "sampling seed (/regen uses seed + 1, + 2, ...)", minimum=0, maximum=2**63 - 1),
    Key("regen_temperature", "float", 0.7, "temperature /regen uses when temperature is 0", minimum=0),
    Key("device", "str", "auto", "local runtime device: auto, cpu, cuda, cuda:N (mps on Apple)",
        choices=("auto", "cpu", "cuda", "cuda:N", "mps")),
    Key("dtype", "str", "auto", "local runtime dtype: auto, float32, bfloat16, float16",
        choices=("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")),
    Key("fp8_weights", "str", "auto", "an FP8 checkpoint's weights: keep (FP8 in memory, FP8 matrix products: half "
        "the memory of bf16), dequantise (to the dtype, at load), or auto: keep on CUDA with compute capability 8.9+, "
        "else dequantise", choices=("auto", "keep", "dequantise")),
    Key("mtp", "bool", True, "speculative decoding with the model's MTP modules (unset: on, but off when "
        "compiling on a CPU, where it decodes slower)"),
    Key("compile", "bool", False, "compile the local runtime's decode steps (torch.compile: a slow first start, "
        "faster decoding)"),
    Key("timeout", "float", 5.0, "sandbox seconds per code cell", minimum=0.1, maximum=DAY),
    Key("memory", "int", 1024, "sandbox memory limit in MB", minimum=16),
    Key("sandbox", "str", "auto", "sandbox isolation: auto (strongest available), bwrap, landlock, rlimits, none",
        choices=("auto", "bwrap", "landlock", "rlimits", "none")),
    Key("server_timeout", "float", 60.0, "seconds to wait for an OpenAI-compatible server", minimum=0.1,
        maximum=DAY),
    Key("followups", "bool", True, "REPL: a question follows up on the earlier ones (unset: on, except with "
        "the embedded model, trained on single problems, where each question starts afresh)"),
    Key("log", "bool", True, "log every exchange to the local SQLite database"),
    Key("clipboard", "str", "auto", "how /copy copies: auto, osc52, command, file",
        choices=("auto", "osc52", "command", "file")),
)
KEY_BY_NAME = {k.name: k for k in KEYS}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


# ---------------------------------------------------------------------------------------------- paths


def _xdg(var: str, fallback: str, env: Mapping[str, str]) -> Path:
    value = env.get(var, "")
    if value and os.path.isabs(value):  # the XDG spec: relative values are ignored
        return Path(value)
    home = env.get("HOME") or str(Path.home())
    return Path(home) / fallback


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """The config file: ``$DUET_CONFIG``, else ``$XDG_CONFIG_HOME/duet/config.toml``."""
    env = os.environ if env is None else env
    if env.get("DUET_CONFIG"):
        return Path(env["DUET_CONFIG"]).expanduser()
    return _xdg("XDG_CONFIG_HOME", ".config", env) / "duet" / "config.toml"


def data_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where duet keeps its data: ``$XDG_DATA_HOME/duet`` (``~/.local/share/duet``)."""
    env = os.environ if env is None else env
    return _xdg("XDG_DATA_HOME", ".local/share", env) / "duet"


def log_path(env: Mapping[str, str] | None = None) -> Path:
    """The SQLite exchange log and feedback store."""
    return data_dir(env) / "logs.sqlite3"


def history_path(env: Mapping[str, str] | None = None) -> Path:
    """The REPL's input history (one JSON string per line)."""
    return data_dir(env) / "repl_history.jsonl"


def clipboard_path(env: Mapping[str, str] | None = None) -> Path:
    """Where /copy writes when no clipboard is reachable."""
    return data_dir(env) / "clipboard.txt"


# ---------------------------------------------------------------------------------------------- values


def convert(key: Key, value: Any, where: str) -> Any:
    """``value`` (a TOML value, or a string from the environment) as ``key``'s type; SettingsError if not."""
    text = isinstance(value, str)
    try:
        if value is None:
            return None
        if key.type == "bool":
            if isinstance(value, bool):
                return value
            if text and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError("expected true or false")
        if key.type == "int":
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError("expected an integer")
            return int(value.strip()) if text else value
        if key.type == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError("expected a number")
            return float(value.strip()) if text else float(value)
        if not text:
            raise ValueError("expected a string")
        value = value.strip()
        if key.choices and not any(re.fullmatch(c.replace("N", r"\d+"), value) for c in key.choices):
            raise ValueError(f"expected one of {', '.join(key.choices)}")
        return value or None
    except ValueError as error:
        message = str(error)
        if not message.startswith("expected"):
            message = {"int": "expected an integer", "float": "expected a number"}.get(key.type, message)
        raise SettingsError(f"{where}: {value!r} is not valid for {key.name}: {message}") from None


def check(key: Key, value: Any, where: str) -> Any:
    """``value`` if it is within ``key``'s range (a float: also finite); SettingsError naming ``where`` if not."""
    if value is None or key.type not in ("int", "float"):
        return value
    low, high = key.minimum, key.maximum
    finite = key.type == "int" or math.isfinite(value)
    if finite and (low is None or value >= low) and (high is None or value <= high):
        return value
    kind = "an integer" if key.type == "int" else "a finite number"
    if low is not None:
        kind += f" from {low} to {high}" if high is not None else f" >= {low}"
    raise SettingsError(f"{where}: {key.name} must be {kind} (got {value!r})")


# ---------------------------------------------------------------------------------------------- TOML


def read_toml(path: Path) -> dict[str, Any]:
    """Parse the config file (tomllib on 3.11+, tomli if installed, else a small flat-TOML reader)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise SettingsError(f"cannot read config file {path}: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SettingsError(f"{path}: not UTF-8 text") from None
    try:
        import tomllib as toml  # type: ignore[import-not-found]
    except ImportError:  # Python 3.10
        try:
            import tomli as toml  # type: ignore[import-not-found,no-redef]
        except ImportError:
            toml = None
    try:
        if toml is not None:
            return toml.loads(text)
        return parse_flat_toml(text)
    except ValueError as error:  # tomllib.TOMLDecodeError is a ValueError
        raise SettingsError(f"{path}: not valid TOML: {error}") from None


_LINE = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=\s*(.+?)\s*$")


def parse_flat_toml(text: str) -> dict[str, Any]:
    """The subset of TOML a duet config file needs: ``key = value`` lines with strings, numbers, booleans."""
    out: dict[str, Any] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise ValueError(f"line {number}: expected key = value")
        key, value = match.groups()
        out[key] = _flat_value(value, number)
    return out


def _flat_value(value: str, number: int) -> Any:
    import json

    if value[0] in "\"'":
        quote = value[0]
        end = value.find(quote, 1)
        while quote == '"' and end > 0 and value[end - 1] == "\\":
            end = value.find(quote, end + 1)
        if end < 0 or value[end + 1 :].strip()[:1] not in ("", "#"):
            raise ValueError(f"line {number}: bad string")
        body = value[1:end]
        return json.loads(f'"{body}"') if quote == '"' else body
    value = value.split("#", 1)[0].strip()
    if value in ("true", "false"):
        return value == "true"
    try:
        return int(value.replace("_", ""))
    except ValueError:
        pass
    try:
        return float(value.replace("_", ""))
    except ValueError:
        raise ValueError(f"line {number}: cannot read value {value!r}") from None


# ---------------------------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """The effective value of every key, and where each came from ("flag", "env DUET_X", "file PATH", "default";
    "invalid ..." for a bad value kept by :func:`load_settings` when it collects errors)."""

    values: dict[str, Any]
    sources: dict[str, str]
    config_file: Path
    warnings: list[str] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def where(self, name: str) -> str:
        """How an error names where ``name``'s value came from: ``--max-rounds``, ``DUET_MAX_ROUNDS`` or
        ``PATH: max_rounds``."""
        kind, _, origin = self.sources.get(name, "default").removeprefix("invalid ").partition(" ")
        return origin if kind == "env" else f"{origin}: {name}" if kind == "file" else "--" + name.replace("_", "-")

    def rows(self) -> list[dict[str, Any]]:
        """One dict per key: key, value, source, env, help (for ``duet config``)."""
        return [
            {"key": k.name, "value": self.values[k.name], "source": self.sources[k.name], "env": k.env,
             "help": k.help}
            for k in KEYS
        ]


def load_settings(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None, *,
                  errors: list[SettingsError] | None = None) -> Settings:
    """Merge flags (None values are "not given"), ``DUET_*`` variables, the config file and defaults.

    Every value is converted and range-checked (:func:`convert`, :func:`check`); the first bad one raises
    SettingsError, unless ``errors`` is given: then each bad value is kept with the source "invalid <source>"
    and its error appended there (``duet config`` shows them all)."""
    env = os.environ if env is None else env
    path = config_path(env)
    values = {k.name: k.default for k in KEYS}
    sources = {k.name: "default" for k in KEYS}
    warnings: list[str] = []

    def put(key: Key, value: Any, where: str, source: str) -> None:
        try:
            typed = source == "flag" and not isinstance(value, str)  # typer has converted it already
            values[key.name] = check(key, value if typed else convert(key, value, where), where)
            sources[key.name] = source
        except SettingsError as error:
            if errors is None:
                raise
            errors.append(error)
            shown = value if not isinstance(value, float) or math.isfinite(value) else str(value)  # JSON has no nan
            values[key.name], sources[key.name] = shown, f"invalid {source}"

    try:
        table = read_toml(path)
    except SettingsError as error:
        if errors is None:
            raise
        errors.append(error)
        table = {}
    for name, value in table.items():
        key = KEY_BY_NAME.get(name.replace("-", "_"))
        if key is None:
            warnings.append(f"{path}: unknown key {name!r} ignored (duet config lists the keys)")
            continue
        put(key, value, f"{path}: {name}", f"file {path}")
    for key in KEYS:
        if key.env in env:
            put(key, env[key.env], key.env, f"env {key.env}")
    for name, value in (flags or {}).items():
        if value is not None:
            put(KEY_BY_NAME[name], value, "--" + name.replace("_", "-"), "flag")
    return Settings(values, sources, path, warnings)
