"""The command-line options of the settings, declared once for ``duet solve``, ``duet repl`` and ``duet eval``.

Each setting of :data:`duet.app.settings.KEYS` that a command takes as a flag is listed in :data:`FLAGS` (its
metavar and short name); the flag's name is the setting's (``max_rounds`` -> ``--max-rounds``, a bool
``--critic/--no-critic``), its type the setting's type, its help the setting's help. A command takes them with
:func:`setting_flags`::

    @app.command()
    @setting_flags(SOLVE_FLAGS)
    def solve(question: str, flags: dict[str, Any]) -> None: ...

Every flag defaults to None ("not given"), so :func:`duet.app.settings.load_settings` can tell a flag from the
environment and the config file; the command receives them in ``flags`` (setting name -> value or None).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Optional

import typer

from duet.app.settings import KEY_BY_NAME, Key

FLAGS: dict[str, tuple[str, ...]] = {
    # setting: (metavar, other names); a bool's metavar is "" (it is --name/--no-name)
    "model": ("DIR", "-m"),
    "critic_model": ("DIR",),
    "backend": ("KIND",),
    "base_url": ("URL",),
    "model_name": ("NAME",),
    "critic_backend": ("KIND",),
    "critic_base_url": ("URL",),
    "critic_model_name": ("NAME",),
    "critic": ("",),
    "number_check": ("",),
    "numbers_as_digits": ("",),
    "critic_solves": ("N",),
    "verify": ("",),
    "verify_threshold": ("P",),
    "samples": ("K",),
    "sample_temperature": ("T",),
    "max_rounds": ("N",),
    "max_tokens": ("N",),
    "max_steps": ("N",),
    "temperature": ("T", "-t"),
    "seed": ("N",),
    "device": ("DEV",),
    "dtype": ("TYPE",),
    "fp8_weights": ("MODE",),
    "mtp": ("",),
    "compile": ("",),
    "timeout": ("SECONDS",),
    "memory": ("MB",),
    "sandbox": ("LEVEL",),
    "log": ("",),
    "followups": ("",),
}
"""The settings that are flags of some command, in the order ``--help`` lists them."""

EVAL_FLAGS = tuple(k for k in FLAGS if k not in ("critic", "log", "followups"))  # eval's modes say critic or not
SOLVE_FLAGS = tuple(k for k in FLAGS if k != "followups")
REPL_FLAGS = tuple(FLAGS)

Replies = Annotated[Optional[str], typer.Option("--replies", metavar="FILE", show_default=False,
                    help="Scripted replies (JSON) for demos and tests (implies --backend scripted).")]
"""``--replies FILE``: not a setting (a command-line choice of backend), taken by the same three commands."""

_TYPES = {"str": str, "path": str, "int": int, "float": float, "bool": bool}


def flag_help(key: Key) -> str:
    """The setting's help as a flag's: capitalised, with its default unless the help says what "unset" means."""
    text = key.help[0].upper() + key.help[1:]
    if "unset" in key.help or key.default is None:
        return text + "."
    default = ("on" if key.default else "off") if key.type == "bool" else f"{key.default:g}" if key.type == "float" \
        else key.default
    return f"{text} [default: {default}]."


def flag_type(name: str, help: str | None = None, aliases: tuple[str, ...] = ()) -> Any:
    """The ``Annotated`` typer option of setting ``name`` (``help``: instead of the setting's; ``aliases``: more
    names, e.g. an old one)."""
    key = KEY_BY_NAME[name]
    metavar, *short = FLAGS[name]
    flag = "--" + name.replace("_", "-")
    if key.type == "bool":
        decls: tuple[str, ...] = (f"{flag}/--no-{flag[2:]}",)
    else:
        decls = (flag, *aliases, *short)
    option = typer.Option(*decls, metavar=metavar or None, help=help or flag_help(key), show_default=False)
    return Annotated[Optional[_TYPES[key.type]], option]


def setting_flags(names: Iterable[str], *, help: Mapping[str, str] | None = None,
                  aliases: Mapping[str, tuple[str, ...]] | None = None) -> Callable[[Callable], Callable]:
    """A typer command's decorator: add the flags of settings ``names`` after the command's own parameters, and
    call it with ``flags={name: value or None}`` in their place. ``help``/``aliases``: per setting, see
    :func:`flag_type`."""
    names = tuple(names)
    help, aliases = help or {}, aliases or {}

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "flags"]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None,
                                   annotation=flag_type(n, help.get(n), aliases.get(n, ()))) for n in names]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            flags = {n: kwargs.pop(n, None) for n in names}
            return command(*args, flags=flags, **kwargs)

        wrapper.__signature__ = inspect.Signature(own + added)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper

    return decorate
