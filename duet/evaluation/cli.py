"""``duet eval``: the command group (mounted by duet/cli.py as ``app.add_typer(eval_app, name="eval")``).

* ``duet eval DATA [OPTIONS]`` (the same as ``duet eval run DATA [OPTIONS]``): run or resume an evaluation.
* ``duet eval report RUN [RUN ...]``: runs side by side, differences with intervals, flipped problems.

A first argument that is not a subcommand name is taken as DATA for ``run`` (a data file literally named
``report`` or ``run`` needs ``duet eval run ./report``). Nothing here imports torch at module level; the
local backend loads it when the run starts.

Exit status: 0 done; 1 an error (one line, ``error: ...``), also when every result of the run is an error or
the run stopped early because its first results all failed (a broken backend); 2 a usage error (a bad flag
or value, a missing DATA or RUN); 130 interrupted (Ctrl-C: the problems in flight are abandoned and run
again on resume).
"""

from __future__ import annotations

import difflib
import shlex
import sys
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperGroup

from duet.app.flags import EVAL_FLAGS, Replies, setting_flags
from duet.evaluation.backend_options import options_help
from duet.terminal import safe_text

EVAL_HELP = {
    "backend": "Solver backend: local, openai (with --base-url), scripted:FILE, or a full spec (local:DIR, "
               "openai:URL#MODEL) [default: local].",
    "temperature": "Sampling temperature of the dialogue modes [default: 0].",
    "seed": "Seed of --shuffle and of sampling (per problem and sample) [default: 0].",
}
"""Where a setting means more in `duet eval` than its help says."""


class _DefaultRunGroup(TyperGroup):
    """A group whose unknown first argument is the DATA of the ``run`` subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            close = difflib.get_close_matches(args[0], list(self.commands), n=1, cutoff=0.7)
            if close and not Path(args[0]).exists():  # a mistyped subcommand, not a data file
                usage_error = sys.modules[typer.BadParameter.__module__].UsageError  # typer's click
                raise usage_error(f"no such data file or command {args[0]!r}; did you mean 'duet eval {close[0]}'?",
                                  ctx)
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    cls=_DefaultRunGroup,
    help=(
        "Evaluate the dialogue on a dataset: `duet eval DATA [OPTIONS]` (same as `duet eval run`), "
        "and compare runs with `duet eval report RUN [RUN ...]`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {safe_text(' '.join(message.split()))}", err=True)
    return typer.Exit(code)


def _consoles() -> tuple[Any, Any]:
    from duet.terminal import SafeConsole

    out = SafeConsole(width=None if sys.stdout.isatty() else 160)
    err = SafeConsole(stderr=True)
    return out, err


@eval_app.command("run")
@setting_flags(EVAL_FLAGS, help=EVAL_HELP, aliases={"timeout": ("--sandbox-timeout",), "memory": ("--sandbox-memory",)})
def run_command(
    data: Path = typer.Argument(..., metavar="DATA",
                                help="JSONL (GSM8K style), JSON array (SVAMP style) or CSV (MAWPS style).",
                                show_default=False),
    out: Path = typer.Option(None, "--out", "-o", metavar="DIR",
                             help="Run directory [default: runs/eval/<data>-<config hash>]; "
                             "running again into it resumes.", show_default=False),
    modes: str = typer.Option("solver+critic", "--modes", metavar="LIST",
                              help="Comma-separated: solver+critic, solver-only, "
                              "no-code, no-code+critic, self-consistency@K."),
    # the model, the dialogue and the sandbox as for `duet solve`: the settings' flags (FLAGS, after these)
    backend_option: list[str] = typer.Option(None, "--backend-option", "-O", metavar="KEY=VALUE",
                                             help="Backend option (repeatable), e.g. -O timeout=120. "
                                             f"{options_help()}.",
                                             show_default=False),
    # the data
    question_field: str = typer.Option(None, "--question-field", metavar="NAME",
                                       help="Question field/column [default: question, "
                                       "Question, problem; Body is prepended when present].", show_default=False),
    answer_field: str = typer.Option(None, "--answer-field", metavar="NAME",
                                     help="Gold answer field/column [default: answer, "
                                     "Answer, solution; GSM8K '#### N' is reduced to N].", show_default=False),
    id_field: str = typer.Option(None, "--id-field", metavar="NAME",
                                 help="Id field/column [default: the line number, or the "
                                 "position in a JSON array].", show_default=False),
    data_format: str = typer.Option(None, "--format", metavar="FMT", help="jsonl, json, csv or tsv [default: from the "
                                    "extension].", show_default=False),
    limit: int = typer.Option(None, "--limit", "-n", metavar="N",
                              help="Evaluate the first N problems (after --shuffle).",
                              show_default=False),
    shuffle: bool = typer.Option(False, "--shuffle", help="Shuffle the problems with --seed before --limit."),
    shard: str = typer.Option(None, "--shard", metavar="I/N", help="Run shard I of N of the selection (1-based, "
                              "round-robin), e.g. 2/4 on the second of four machines.", show_default=False),
    strict: bool = typer.Option(False, "--strict", help="Stop before any work if a row is malformed "
                                "[default: skip it with a warning]."),
    # the dialogue
    concurrency: int = typer.Option(None, "--concurrency", "-j", metavar="N",
                                    help="Problems in flight at once [default: 8, "
                                    "16 for openai]. On the local runtime: the engine's batch size.",
                                    show_default=False),
    token_budget: int = typer.Option(None, "--token-budget", metavar="N", help="Generated tokens per dialogue "
                                     "[default: none].", show_default=False),
    sc_temperature: float = typer.Option(0.7, "--sc-temperature", metavar="T",
                                         help="Temperature of self-consistency samples."),
    sandbox_isolation: str = typer.Option(None, "--sandbox-isolation", metavar="LEVEL", hidden=True,
                                          help="The old name of --sandbox.", show_default=False),
    prompt_dir: Path = typer.Option(None, "--prompt-dir", metavar="DIR",
                                    help="Directory of prompt templates overriding the "
                                    "built-in ones.", show_default=False),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="On resume, run again the problems that "
                                      "ended in a backend, sandbox or evaluation error."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar (a line every ~10% instead)."),
    replies: Replies = None,
    *,
    flags: dict[str, Any],  # the settings' flags, from setting_flags
) -> None:
    """Run (or resume) an evaluation of DATA; prints a summary table per mode."""
    from duet.agents.backends import BackendError
    from duet.app.errors import UsageProblem
    from duet.errors import DuetError
    from duet.evaluation.backend_options import options_for_backend, parse_backend_options
    from duet.evaluation.datasets import Fields
    from duet.evaluation.report import print_summary
    from duet.evaluation.run_types import EvalOptions
    from duet.evaluation.runner import run_eval

    stdout, stderr = _consoles()
    sandbox = flags["sandbox"]
    if sandbox is not None and sandbox_isolation is not None and sandbox != sandbox_isolation:
        raise _fail(f"--sandbox {sandbox} and --sandbox-isolation {sandbox_isolation} (its old name) disagree; "
                    "give --sandbox only", UsageProblem.exit_code)
    flags = {**flags, "sandbox": sandbox if sandbox is not None else sandbox_isolation}
    try:
        from duet.app.backends import backend_options, backend_specs, dialogue_config
        from duet.app.settings import load_settings

        settings = load_settings(flags)
        for warning in settings.warnings:
            typer.echo(f"warning: {safe_text(warning)}", err=True)
        specs = backend_specs(settings, replies)
        extra = parse_backend_options(backend_option or [], [specs.solver, specs.critic])
        options = EvalOptions(
            data=data, out=out, backend=specs.solver, critic_backend=specs.critic, modes=modes,
            fields=Fields(question_field, answer_field, id_field), format=data_format, limit=limit,
            shuffle=shuffle, seed=settings.seed, shard=shard, strict=strict, concurrency=concurrency,
            dialogue=dialogue_config(settings, token_budget=token_budget, prompt_dir=prompt_dir),
            sc_temperature=sc_temperature,
            backend_options={**backend_options(specs.solver, settings), **options_for_backend(specs.solver, extra)},
            critic_options={**backend_options(specs.critic, settings), **options_for_backend(specs.critic, extra)}
            if specs.critic else None,
            retry_errors=retry_errors,
        )
        _check_numbers(options)
        live = stderr.is_terminal and not no_progress
        outcome = run_eval(options, say=lambda line: typer.echo(safe_text(line), err=True), live=live, console=stderr)
    except (DuetError, BackendError) as error:
        raise _fail(str(error), getattr(error, "exit_code", 1)) from None
    if outcome.aborted is not None:
        raise _fail(f"{outcome.aborted}; every problem so far failed, stopping (fix it and resume with "
                    f"{_resume_command()})")
    print_summary(outcome.summary, stdout)
    stdout.print(f"results: {outcome.run_dir / 'results.jsonl'}  summary: {outcome.run_dir / 'summary.json'}")
    if outcome.interrupted:
        typer.echo(f"interrupted after {outcome.completed} new result(s); run the same command again to resume",
                   err=True)
        raise typer.Exit(130)
    _report_errors(outcome)


def _report_errors(outcome: Any) -> None:
    """One line when some results are errors (how many, how to retry them); exit 1 when all of them are."""
    from duet.evaluation.modes import FAILED

    modes = outcome.summary.get("modes") or {}
    total = sum(s["n"] for s in modes.values())
    errors = sum(s["errors"] for s in modes.values())
    if not errors:
        return
    if errors == total:
        example = next((r.get("error") for r in outcome.records if r.get("stop_reason") in FAILED and r.get("error")),
                       None)
        raise _fail(f"every result ({total}) ended in an error{f', e.g. {example}' if example else ''}; fix it "
                    f"and run them again with {_resume_command()}")
    typer.echo(f"warning: {errors} of {total} result(s) ended in an error (backend, sandbox or duet eval); run "
               f"them again with {_resume_command()}", err=True)


def _resume_command(flag: str = "--retry-errors") -> str:
    """This invocation's command line with ``flag`` added (the same --out, so it resumes the run)."""
    args = sys.argv[1:]
    if args[:1] == ["eval"]:
        args = args[1:]
    if flag not in args:
        args = [*args, flag]
    return "duet eval " + shlex.join(args)


def _check_numbers(options: Any) -> None:
    """The options duet.app.settings does not already check."""
    import math

    from duet.app.errors import UsageProblem

    if options.dialogue.token_budget is not None and options.dialogue.token_budget < 1:
        raise UsageProblem(f"--token-budget {options.dialogue.token_budget}: must be >= 1")
    if not math.isfinite(options.sc_temperature) or options.sc_temperature < 0:
        raise UsageProblem(f"--sc-temperature {options.sc_temperature:g}: must be a number >= 0")


@eval_app.command("report")
def report_command(
    runs: list[Path] = typer.Argument(..., metavar="RUN...",
                                      help="Run directories of `duet eval`.", show_default=False),
    baseline: str = typer.Option(None, "--baseline", metavar="NAME",
                                 help="The system the others are compared with: a mode "
                                 "(one run) or RUN/MODE (default: the first).", show_default=False),
    merge: bool = typer.Option(False, "--merge", help="Treat the runs as one (e.g. the shards of one run)."),
    flips: int = typer.Option(20, "--flips", metavar="N", help="Flipped problems to list per comparison (0: none)."),
    unpaired: bool = typer.Option(False, "--unpaired", help="Compare accuracies as independent samples, not "
                                  "paired by problem id: needed for runs made on different data files "
                                  "(no flips then)."),
    json_out: Path = typer.Option(None, "--json", metavar="FILE",
                                  help="Also write the whole report as JSON to this file.",
                                  show_default=False),
    plot: Path = typer.Option(None, "--plot", metavar="DIR", help="Also draw the verifier's calibration and the "
                              "accuracy per mode and kind as PNG files in DIR (needs matplotlib: duet[plot]).",
                              show_default=False),
) -> None:
    """Compare runs: modes side by side, differences with 95% intervals (paired by problem id), flips.

    Runs made on different data files (their data hashes differ) are refused unless --unpaired."""
    from duet.errors import DuetError
    from duet.evaluation.report import build_report, print_report
    from duet.evaluation.results import write_json_atomic

    stdout, _ = _consoles()
    if json_out is not None and json_out.is_dir():
        raise _fail(f"--json {json_out}: is a directory; give a file name, e.g. {json_out / 'report.json'}", 2)
    try:
        report = build_report(runs, merge=merge, baseline=baseline, unpaired=unpaired)
    except DuetError as error:
        raise _fail(str(error), getattr(error, "exit_code", 1)) from None
    print_report(report, stdout, flips=flips)
    if plot is not None:
        from duet.evaluation.plots import write_plots
        from duet.evaluation.report import system_records

        try:
            for path in write_plots(system_records(runs, merge=merge), plot):
                stdout.print(f"wrote {path}")
        except DuetError as error:
            raise _fail(str(error), getattr(error, "exit_code", 1)) from None
        except OSError as error:
            raise _fail(f"--plot {plot}: cannot write there: {error.strerror or error}") from None
    if json_out is not None:
        try:
            write_json_atomic(json_out, report, indent=2, sync=False)
        except OSError as error:
            raise _fail(f"--json {json_out}: cannot write it: {error.strerror or error}") from None


def main() -> None:
    """``python -m duet.evaluation.cli`` (the same as ``duet eval``)."""
    eval_app(prog_name="duet eval")


if __name__ == "__main__":
    main()
