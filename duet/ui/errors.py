"""Errors of the command line itself (as opposed to the model, the backends or the sandbox)."""

from __future__ import annotations

from duet.errors import DuetError


class UsageProblem(DuetError):
    """The command was called wrongly (no question, conflicting options): exit code 2, like a bad flag."""

    exit_code = 2
