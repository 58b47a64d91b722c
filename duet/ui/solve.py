"""``duet solve``: one question, rendered live, logged, with a documented result and exit code.

Output modes: on a terminal, rich rendering (:class:`duet.ui.render.RichRenderer`) and the answer
panel; on a pipe, the same as plain text; ``--quiet``: only the answer on stdout; ``--json``: only
one JSON object on stdout (progress goes to stderr when it is a terminal).

The ``--json`` object is ``DialogueResult.to_dict()`` (duet.agents.transcript) plus two keys::

    version            1 (the transcript format)
    question           the question
    answer             the final answer (the agreed one; else the solver's last), or null
    agreed             true when the critic agreed
    rounds             solver turns
    stop_reason        agreed | max_rounds | token_budget | repeated_reply | no_answer | context_full |
                       backend_error | sandbox_error | no_critic | interrupted
    error              one line when stop_reason is an error, else null
    solver_model, critic_model (null without a critic)
    prompt_tokens, completion_tokens, seconds
    config             the dialogue options
    turns              the transcript: one object per turn (agent, round, task, model, messages, text,
                       steps [{text, code, output, ok, error, ...}], answer, verdict, reason, finish, ...)
    exit_code          the exit code of the command (below)
    log_id             the exchange's id in the log (``duet logs show ID``), or null with --no-log

When the command fails before the dialogue has a result (a bad flag or setting, no question, no model at that
path), ``--json`` still prints one object with these keys: ``error`` and ``exit_code`` say what happened,
``stop_reason`` is null, ``answer`` null, ``turns`` empty (:func:`failure`); ``question`` is null when it
was not read yet.

Exit codes: 0 answered and the critic agreed (or, with --no-critic, answered); 1 error (bad input,
model, backend, sandbox); 2 usage error (bad flag, no question); 3 finished without agreement or
without an answer; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import json
import shlex
import sys
import threading
from pathlib import Path
from typing import Any

from duet.app.errors import UsageProblem
from duet.app.settings import Settings, load_settings, log_path
from duet.app.store import Store, StoreError
from duet.terminal import safe_text

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_AGREEMENT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def exit_code(result: Any) -> int:
    """The exit code of a finished dialogue (see the module docstring)."""
    if result.stop_reason == "interrupted":
        return EXIT_INTERRUPTED
    if result.stop_reason in ("backend_error", "sandbox_error"):
        return EXIT_ERROR
    if result.answer is not None and (result.agreed or result.stop_reason == "no_critic"):
        return EXIT_OK
    return EXIT_NO_AGREEMENT


def read_question(question: str | None, file: str | None) -> str:
    """The question from the argument, ``--file`` (``-``: stdin) or stdin; UsageProblem when there is none."""
    if question is not None and file is not None:
        raise UsageProblem("give the question as an argument or with --file, not both")
    if file is not None:
        if file == "-":
            text = sys.stdin.read()
        else:
            try:
                text = Path(file).expanduser().read_text(encoding="utf-8")
            except FileNotFoundError:
                raise UsageProblem(f"--file {file}: no such file") from None
            except (OSError, UnicodeDecodeError) as error:
                raise UsageProblem(f"--file {file}: cannot read it ({getattr(error, 'strerror', None) or error})"
                                   ) from None
    elif question == "-" or (question is None and not sys.stdin.isatty()):
        text = sys.stdin.read()
    elif question is None:
        raise UsageProblem("no question: pass it as an argument, on stdin, or with --file FILE")
    else:
        text = question
    text = text.strip()
    if not text:
        raise UsageProblem("the question is empty")
    return text


def warn(message: str) -> None:
    """A one-line warning on stderr."""
    print(f"warning: {safe_text(message)}", file=sys.stderr)


def loading_status(settings: Settings, specs: Any) -> Any:
    """A spinner on stderr while a local model loads (a no-op context elsewhere)."""
    import contextlib

    if not sys.stderr.isatty() or not any(s and s.startswith("local:") for s in (specs.solver, specs.critic)):
        return contextlib.nullcontext()
    from duet.terminal import SafeConsole

    name = specs.solver.partition(":")[2] or "the embedded model"
    return SafeConsole(stderr=True).status(f"loading {name} ...", spinner="dots")


def open_backends(flags: dict[str, Any], replies: str | None) -> tuple[Settings, Any, Any, Any]:
    """Settings (warnings printed), backend specs, and the solver's and critic's backends (with a spinner)."""
    from duet.app.backends import backend_specs, build_backends

    settings = load_settings(flags)
    for message in settings.warnings:
        warn(message)
    specs = backend_specs(settings, replies)
    with loading_status(settings, specs):
        solver, critic = build_backends(settings, specs)
    return settings, specs, solver, critic


def make_renderer(mode: str) -> Any:
    """The renderer for "human", "json" or "quiet" output on this process's streams."""
    from duet.ui import render

    if mode == "human":
        if sys.stdout.isatty():
            from duet.terminal import SafeConsole

            return render.RichRenderer(SafeConsole(highlight=False))
        return render.PlainRenderer(sys.stdout)
    if sys.stderr.isatty():
        from duet.terminal import SafeConsole

        return render.ProgressRenderer(SafeConsole(stderr=True))
    return render.NullRenderer()


def failure(message: str, code: int, question: str | None = None) -> dict[str, Any]:
    """The ``--json`` object of a run that failed before its dialogue had a result: a finished run's keys."""
    from duet.agents.transcript import TRANSCRIPT_VERSION

    return {"version": TRANSCRIPT_VERSION, "question": question, "answer": None, "agreed": False, "rounds": 0,
            "stop_reason": None, "turns": [], "error": message, "solver_model": None, "critic_model": None,
            "prompt_tokens": 0, "completion_tokens": 0, "seconds": 0.0, "config": None, "exit_code": code,
            "log_id": None}


def print_json(data: dict[str, Any]) -> None:
    """``data`` as the one JSON object on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=True, default=str) + "\n")
    sys.stdout.flush()


def print_failure(message: str, code: int, question: str | None = None) -> None:
    """Print :func:`failure`'s object on stdout (``solve --json`` when the command cannot run)."""
    print_json(failure(message, code, question))


def run_solve(question: str | None, file: str | None, *, as_json: bool, quiet: bool, flags: dict[str, Any],
              replies: str | None = None, extra: list[str] | tuple[str, ...] = ()) -> int:
    """The whole command; returns the exit code. ``extra``: words after the question (it was not quoted).

    With ``as_json``, an error before the dialogue's result is printed still prints one JSON object
    (:func:`failure`) before it propagates to the CLI's one-line error."""
    from duet.agents.dialogue import Dialogue
    from duet.app.backends import dialogue_config, run_cancellable
    from duet.app.errors import describe

    text = None
    try:
        if extra:
            words = " ".join([question or "", *extra]).strip()
            raise UsageProblem(f"the question must be one argument: duet solve {shlex.quote(words)}")
        if as_json and quiet:
            raise UsageProblem("--json and --quiet do not go together")
        text = read_question(question, file)
        settings, specs, solver, critic = open_backends(flags, replies)
        mode = "json" if as_json else "quiet" if quiet else "human"
        renderer = make_renderer(mode)
        cancel = threading.Event()
        dialogue = Dialogue(solver, critic, dialogue_config(settings), on_event=renderer)

        def interrupted(count: int) -> None:
            renderer.note("stopping ..." if count == 1 else "still stopping (the current step is finishing) ...")

        try:
            result = run_cancellable(lambda: dialogue.run(text, cancel=cancel), cancel, interrupted)
        finally:
            renderer.close()
    except (Exception, KeyboardInterrupt) as error:
        if as_json:
            print_failure(*describe(error), question=text)
        raise
    code = exit_code(result)
    if mode == "human":
        renderer.final(result, critic=settings.critic)
    log_id = None
    if settings.log:
        store = Store(log_path())
        try:
            log_id = store.log_exchange(result, command="solve")
        except StoreError as error:
            warn(f"not logged: {error}")
        finally:
            store.close()
    if mode == "json":
        print_json({**result.to_dict(), "exit_code": code, "log_id": log_id})
    elif mode == "quiet" and result.answer is not None:
        sys.stdout.write(safe_text(result.answer) + "\n")
    sys.stdout.flush()
    if code == EXIT_ERROR:
        print(f"error: {safe_text(result.error or result.stop_reason)}", file=sys.stderr)
    elif code == EXIT_INTERRUPTED:
        print("interrupted", file=sys.stderr)
    return code
