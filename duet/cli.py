"""The `duet` command.

This module declares the commands and their options only; each command imports its implementation
(duet.ui.*, and torch only when a local model is built) when it runs, so `duet --help` and
`duet --version` start in a fraction of a second. Errors end as one line on stderr, `error: ...`,
with a non-zero exit code (DUET_DEBUG=1 shows the traceback of an unexpected one).
"""

import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer

from duet import __version__
from duet.app.flags import REPL_FLAGS, SOLVE_FLAGS, Replies, setting_flags
from duet.bench import bench_command
from duet.evaluation.cli import eval_app
from duet.serve.cli import serve_command
from duet.terminal import safe_text
from duet.train.cli import train_command
from duet.ui.plan import plan_command

app = typer.Typer(
    name="duet",
    help="A solver and a critic that reason with code, on a local DeepSeek-V3-architecture runtime.\n\n"
    "Start with `duet solve \"QUESTION\"` or `duet repl`. Defaults come from the config file and DUET_* "
    "variables (`duet config`); `duet doctor` checks the installation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: no rich import on --help
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_CODES = """\
\b
Exit codes:
  0    answered, and the critic agreed (with --no-critic: answered)
  1    error: bad input, no model at that path, a server that does not answer, a sandbox failure
  2    usage error: a bad flag or value, no question
  3    finished without agreement or without an answer
  130  interrupted (Ctrl-C)"""


def _version(value: bool) -> None:
    if value:
        typer.echo(f"duet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """duet: local multi-agent reasoning."""


# ------------------------------------------------------------------------------------------- options
# The settings' flags are declared once, in duet.app.flags (shared with `duet eval`).

Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def _boundary(run: Callable[[], Any]) -> Any:
    """Run a command body; user errors (and OSErrors) become `error: <one line>` and their exit code."""
    from duet.app.errors import describe, is_user_error

    try:
        code = run()
    except Exception as error:
        if is_user_error(error) or (isinstance(error, OSError) and not os.environ.get("DUET_DEBUG")):
            _fail(*describe(error))
        raise
    if code:
        raise typer.Exit(code)
    return code


def _fail(message: str, code: int) -> None:
    print(f"error: {safe_text(' '.join(message.split()))}", file=sys.stderr)
    raise typer.Exit(code)


# ------------------------------------------------------------------------------------------- solve


@app.command(epilog=EXIT_CODES, context_settings={"allow_extra_args": True})  # extra words: see run_solve
@setting_flags(SOLVE_FLAGS)
def solve(
    ctx: typer.Context,
    question: Annotated[Optional[str], typer.Argument(
        help="The question; '-' or none reads stdin.", show_default=False)] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", metavar="FILE",
                    help="Read the question from FILE ('-': stdin).")] = None,
    as_json: Json = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the answer.")] = False,
    replies: Replies = None,
    *,
    flags: dict[str, Any],  # the settings' flags, from setting_flags
) -> None:
    """Solve one question: the solver works step by step with code, the critic checks.

    Live output on a terminal, plain text on a pipe, only the answer with --quiet, one JSON object
    with --json, also when the command fails (answer, agreed, rounds, stop_reason, turns, error,
    exit_code: the schema is in the README and in duet/ui/solve.py). The exchange is logged
    (`duet logs`) unless --no-log.
    """

    def run() -> int:
        from duet.ui.solve import run_solve

        return run_solve(question, file, as_json=as_json, quiet=quiet, flags=flags, replies=replies,
                         extra=ctx.args)

    _boundary(run)


# ------------------------------------------------------------------------------------------- repl


@app.command()
@setting_flags(REPL_FLAGS)
def repl(replies: Replies = None, *, flags: dict[str, Any]) -> None:
    """Talk with the agents: follow-ups keep the context (with the embedded model each question starts afresh);
    /help lists the commands.

    \b
    After a response: /copy, /good, /bad [comment], /regen; also /save FILE,
    /model [DIR], /critic on|off, /followups on|off, /clear, /help, /quit. Ctrl-C stops a response,
    Ctrl-D leaves. End a line with \\ or open a \"\"\" block for multi-line input
    (pasting works too).
    """

    def run() -> int:
        from duet.ui.repl import run_repl

        return run_repl(flags=flags, replies=replies)

    _boundary(run)


# ------------------------------------------------------------------------------------------- config


@app.command("config")
def config_command(as_json: Json = False) -> None:
    """Show the effective settings and where each comes from (flag, env, file, default).

    A bad value in the config file or a DUET_* variable is shown with the source "invalid", and the command
    then prints each problem as `error: ...` and exits with 2."""

    def run() -> int:
        from duet.ui.views import show_config

        errors: list = []
        code = show_config(as_json=as_json, errors=errors)
        for error in errors:
            print(f"error: {safe_text(error)}", file=sys.stderr)
        return code or (errors[0].exit_code if errors else 0)

    _boundary(run)


# ------------------------------------------------------------------------------------------- logs

logs_app = typer.Typer(help="List, search and show logged exchanges.", no_args_is_help=False,
                       rich_markup_mode=None)
app.add_typer(logs_app, name="logs")


@logs_app.callback(invoke_without_command=True)
def logs_list(
    ctx: typer.Context,
    search: Annotated[Optional[str], typer.Option("--search", "-s", metavar="TEXT",
                      help="Only exchanges whose question or answer contains TEXT.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", metavar="N", min=1,
                                       help="How many, newest first.")] = 20,
    as_json: Json = False,
) -> None:
    """List the latest exchanges (newest first); `duet logs show ID` shows one."""
    if ctx.invoked_subcommand is not None:
        return

    def run() -> int:
        from duet.ui.views import list_logs

        return list_logs(search=search, limit=limit, as_json=as_json)

    _boundary(run)


@logs_app.command("show")
def logs_show(
    exchange_id: Annotated[int, typer.Argument(metavar="ID", help="The exchange's id (from `duet logs`).")],
    as_json: Json = False,
) -> None:
    """Show one exchange: question, transcript, answer and rating."""

    def run() -> int:
        from duet.ui.views import show_log

        return show_log(exchange_id, as_json=as_json)

    _boundary(run)


# ------------------------------------------------------------------------------------------- feedback

feedback_app = typer.Typer(help="The ratings given with /good and /bad.", no_args_is_help=True,
                           rich_markup_mode=None)
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("export")
def feedback_export(
    fmt: Annotated[str, typer.Option("--format", metavar="jsonl|csv",
                   help="JSON lines (with transcripts) or CSV.")] = "jsonl",
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="FILE",
                      help="Write to FILE instead of stdout.")] = None,
    rating: Annotated[Optional[str], typer.Option("--rating", metavar="good|bad",
                      help="Only this rating.")] = None,
) -> None:
    """Dump every rated exchange: rating, comment, prompt, response, model and times."""

    def run() -> int:
        from duet.ui.views import export_feedback

        return export_feedback(fmt=fmt, output=output, rating=rating)

    _boundary(run)


# ------------------------------------------------------------------------------------------- doctor


@app.command()
def doctor(as_json: Json = False) -> None:
    """Check the installation: versions, device, kernels, sandbox, embedded model, paths."""

    def run() -> int:
        from duet.ui.doctor import run_doctor

        return run_doctor(as_json=as_json)

    _boundary(run)


# ------------------------------------------------------------------------------------------- eval, train, bench
# Written in their own packages; each module imports torch only when its command runs.
app.add_typer(eval_app, name="eval")
app.command("train")(train_command)
app.command("bench")(bench_command)
app.command("serve")(serve_command)
app.command("plan")(plan_command)


# ------------------------------------------------------------------------------------------- main


def main(argv: Optional[list] = None) -> None:
    """The console script: runs the app with one-line usage errors and no tracebacks for user errors.

    Started by torchrun (`torchrun --nproc-per-node N -m duet ...`, WORLD_SIZE above 1), rank 0 runs the command
    and the other ranks hold their parts of its local model and follow its engine (`duet.engine.distributed`);
    except `duet train`, data parallel under `accelerate launch` or torchrun: every process runs it."""
    # Idle OpenMP threads sleep instead of spinning (before torch loads): the engine decodes in its own
    # thread, and on a shared machine spinning threads made decoding several times slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = (sys.argv[1:] if argv is None else list(argv))[:1]
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1") and command != ["train"]:
        from duet.engine.distributed import launch

        launch(lambda: _run(argv))
    else:
        _run(argv)


def _run(argv: Optional[list]) -> None:
    exceptions = sys.modules[typer.BadParameter.__module__]  # click's exceptions, wherever typer keeps them
    try:
        code = app(args=argv, prog_name="duet", standalone_mode=False)
    except exceptions.UsageError as error:
        ctx = getattr(error, "ctx", None)
        if type(error).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            sys.exit(0)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        message = f"{' '.join(error.format_message().split())}{where}"
        args = sys.argv[1:] if argv is None else list(argv)
        args = args[: args.index("--")] if "--" in args else args
        if ctx is not None and ctx.info_name == "solve" and "--json" in args:
            from duet.ui.solve import print_failure  # `solve --json` always prints its one JSON object

            print_failure(message, error.exit_code)
        print(f"error: {safe_text(message)}", file=sys.stderr)
        sys.exit(error.exit_code)
    except exceptions.ClickException as error:
        print(f"error: {safe_text(' '.join(error.format_message().split()))}", file=sys.stderr)
        sys.exit(error.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(1)
    except Exception as error:
        if os.environ.get("DUET_DEBUG"):
            raise
        from duet.app.errors import describe

        message, code = describe(error)  # also a user error from a mounted command that does not catch its own
        print(f"error: {safe_text(message)}", file=sys.stderr)
        sys.exit(code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
