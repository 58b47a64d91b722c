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
from duet.bench import bench_command
from duet.evaluation.cli import eval_app
from duet.serve.cli import serve_command
from duet.train.cli import train_command

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
# Every option defaults to None ("not given"), so duet.app.settings can tell a flag from the env and the
# config file. The names match the config keys.

Model = Annotated[Optional[str], typer.Option("--model", "-m", metavar="DIR",
                  help="Solver checkpoint directory [default: the embedded model].")]
Backend = Annotated[Optional[str], typer.Option("--backend", metavar="KIND",
                    help="local, openai (with --base-url), or scripted:FILE [default: local].")]
BaseUrl = Annotated[Optional[str], typer.Option("--base-url", metavar="URL",
                    help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (implies --backend openai).")]
ModelName = Annotated[Optional[str], typer.Option("--model-name", metavar="NAME",
                      help="Model name on the server [default: the first it lists].")]
Replies = Annotated[Optional[str], typer.Option("--replies", metavar="FILE",
                    help="Scripted replies (JSON) for demos and tests (implies --backend scripted).")]
CriticModel = Annotated[Optional[str], typer.Option("--critic-model", metavar="DIR",
                        help="Critic checkpoint directory [default: the solver's model].")]
CriticBackend = Annotated[Optional[str], typer.Option("--critic-backend", metavar="KIND",
                          help="Critic backend [default: the solver's].")]
CriticBaseUrl = Annotated[Optional[str], typer.Option("--critic-base-url", metavar="URL",
                          help="Critic's OpenAI-compatible server.")]
CriticModelName = Annotated[Optional[str], typer.Option("--critic-model-name", metavar="NAME",
                            help="Critic's model name on the server.")]
Critic = Annotated[Optional[bool], typer.Option("--critic/--no-critic",
                   help="Run the critic, or the solver alone [default: critic].", show_default=False)]
NumberCheck = Annotated[Optional[bool], typer.Option("--number-check/--no-number-check",
                        help="The critic first rejects code numbers the problem never gives [default: on].",
                        show_default=False)]
CriticSolves = Annotated[Optional[int], typer.Option("--critic-solves", metavar="N",
                         help="Times the critic solves the problem itself (sampled) before its model check; "
                              "0: never [default: 0].")]
MaxRounds = Annotated[Optional[int], typer.Option("--max-rounds", metavar="N",
                      help="Solver turns the critic checks before giving up [default: 3].")]
MaxTokens = Annotated[Optional[int], typer.Option("--max-tokens", metavar="N",
                      help="Generated tokens per turn [default: 1024].")]
MaxSteps = Annotated[Optional[int], typer.Option("--max-steps", metavar="N",
                     help="Code cells per turn [default: 8].")]
Temperature = Annotated[Optional[float], typer.Option("--temperature", "-t", metavar="T",
                        help="Sampling temperature; 0 is greedy [default: 0].")]
Seed = Annotated[Optional[int], typer.Option("--seed", metavar="N", help="Sampling seed, 0 to 2**63-1 [default: 0].")]
Device = Annotated[Optional[str], typer.Option("--device", metavar="DEV",
                   help="Local runtime device: auto, cpu, cuda, cuda:N, mps [default: auto].")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", metavar="TYPE",
                  help="Local runtime dtype: auto, float32, bfloat16, float16 [default: auto].")]
Mtp = Annotated[Optional[bool], typer.Option("--mtp/--no-mtp",
                help="Speculative decoding with the model's MTP modules [default: on, off with --compile on "
                     "a CPU].", show_default=False)]
Compile = Annotated[Optional[bool], typer.Option("--compile/--no-compile",
                    help="Compile the local runtime's decode steps with torch.compile: a slow first start "
                         "(cached on disk afterwards), faster decoding [default: off].", show_default=False)]
Timeout = Annotated[Optional[float], typer.Option("--timeout", metavar="SECONDS",
                    help="Sandbox time limit per code cell, up to 86400 [default: 5].")]
Memory = Annotated[Optional[int], typer.Option("--memory", metavar="MB",
                   help="Sandbox memory limit [default: 1024].")]
Sandbox = Annotated[Optional[str], typer.Option("--sandbox", metavar="LEVEL",
                    help="Sandbox isolation: auto, bwrap, landlock, rlimits, or none (explicit opt-out) "
                         "[default: auto].")]
Log = Annotated[Optional[bool], typer.Option("--log/--no-log",
                help="Log the exchange to the local database [default: on].", show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def _flags(values: dict[str, Any]) -> dict[str, Any]:
    """The settings given on the command line: the parameters named like a key of duet.app.settings.KEYS."""
    from duet.app.settings import KEY_BY_NAME

    return {k: v for k, v in values.items() if k in KEY_BY_NAME}


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
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    raise typer.Exit(code)


# ------------------------------------------------------------------------------------------- solve


@app.command(epilog=EXIT_CODES, context_settings={"allow_extra_args": True})  # extra words: see run_solve
def solve(
    ctx: typer.Context,
    question: Annotated[Optional[str], typer.Argument(
        help="The question; '-' or none reads stdin.", show_default=False)] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", metavar="FILE",
                    help="Read the question from FILE ('-': stdin).")] = None,
    as_json: Json = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the answer.")] = False,
    model: Model = None,
    critic_model: CriticModel = None,
    backend: Backend = None,
    base_url: BaseUrl = None,
    model_name: ModelName = None,
    critic_backend: CriticBackend = None,
    critic_base_url: CriticBaseUrl = None,
    critic_model_name: CriticModelName = None,
    replies: Replies = None,
    critic: Critic = None,
    number_check: NumberCheck = None,
    critic_solves: CriticSolves = None,
    max_rounds: MaxRounds = None,
    max_tokens: MaxTokens = None,
    max_steps: MaxSteps = None,
    temperature: Temperature = None,
    seed: Seed = None,
    device: Device = None,
    dtype: Dtype = None,
    mtp: Mtp = None,
    compile: Compile = None,
    timeout: Timeout = None,
    memory: Memory = None,
    sandbox: Sandbox = None,
    log: Log = None,
) -> None:
    """Solve one question: the solver works step by step with code, the critic checks.

    Live output on a terminal, plain text on a pipe, only the answer with --quiet, one JSON object
    with --json, also when the command fails (answer, agreed, rounds, stop_reason, turns, error,
    exit_code: the schema is in the README and in duet/ui/solve.py). The exchange is logged
    (`duet logs`) unless --no-log.
    """
    flags = _flags(locals())

    def run() -> int:
        from duet.ui.solve import run_solve

        return run_solve(question, file, as_json=as_json, quiet=quiet, flags=flags, replies=replies,
                         extra=ctx.args)

    _boundary(run)


# ------------------------------------------------------------------------------------------- repl


@app.command()
def repl(
    model: Model = None,
    critic_model: CriticModel = None,
    backend: Backend = None,
    base_url: BaseUrl = None,
    model_name: ModelName = None,
    critic_backend: CriticBackend = None,
    critic_base_url: CriticBaseUrl = None,
    critic_model_name: CriticModelName = None,
    replies: Replies = None,
    critic: Critic = None,
    number_check: NumberCheck = None,
    critic_solves: CriticSolves = None,
    max_rounds: MaxRounds = None,
    max_tokens: MaxTokens = None,
    max_steps: MaxSteps = None,
    temperature: Temperature = None,
    seed: Seed = None,
    device: Device = None,
    dtype: Dtype = None,
    mtp: Mtp = None,
    compile: Compile = None,
    timeout: Timeout = None,
    memory: Memory = None,
    sandbox: Sandbox = None,
    log: Log = None,
    followups: Annotated[Optional[bool], typer.Option(
        "--followups/--no-followups", help="Questions follow up on the earlier ones [default: on, but off with "
        "the embedded model, trained on single problems].", show_default=False)] = None,
) -> None:
    """Talk with the agents: follow-ups keep the context (with the embedded model each question starts afresh);
    /help lists the commands.

    \b
    After a response: /copy, /good, /bad [comment], /regen; also /save FILE,
    /model [DIR], /critic on|off, /followups on|off, /clear, /help, /quit. Ctrl-C stops a response,
    Ctrl-D leaves. End a line with \\ or open a \"\"\" block for multi-line input
    (pasting works too).
    """
    flags = _flags(locals())

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
            print(f"error: {error}", file=sys.stderr)
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


# ------------------------------------------------------------------------------------------- main


def main(argv: Optional[list] = None) -> None:
    """The console script: runs the app with one-line usage errors and no tracebacks for user errors."""
    # Idle OpenMP threads sleep instead of spinning (before torch loads): the engine decodes in its own
    # thread, and on a shared machine spinning threads made decoding several times slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
        print(f"error: {message}", file=sys.stderr)
        sys.exit(error.exit_code)
    except exceptions.ClickException as error:
        print(f"error: {' '.join(error.format_message().split())}", file=sys.stderr)
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
        print(f"error: {message}", file=sys.stderr)
        sys.exit(code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
