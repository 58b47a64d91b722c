"""The `duet` command.

Heavy modules (torch, transformers) are imported inside the commands that need them, so
`duet --help` and `duet --version` start in a fraction of a second.
"""

from __future__ import annotations

import typer

from duet import __version__

app = typer.Typer(
    name="duet",
    help="A solver and a critic that reason with code, on a local DeepSeek-V3-architecture runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
