"""Errors of the command line itself (as opposed to the model, the backends or the sandbox), and how any error
is reported."""

from __future__ import annotations

from duet.errors import DuetError


class UsageProblem(DuetError):
    """The command was called wrongly (no question, conflicting options): exit code 2, like a bad flag."""

    exit_code = 2


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is one of duet's one-line user errors."""
    from duet.agents.backends import BackendError
    from duet.prompts import PromptError

    return isinstance(error, (DuetError, BackendError, PromptError))


def describe(error: BaseException) -> tuple[str, int]:
    """The one line (after ``error: ``) and the exit code with which the CLI reports ``error``."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", 130
    message = " ".join(str(error).split())
    if is_user_error(error):
        return message, getattr(error, "exit_code", 1)
    if isinstance(error, OSError):  # an unreadable file, a full disk
        return (f"{error.filename}: {error.strerror}" if error.filename and error.strerror else message), 1
    return f"unexpected {type(error).__name__}: {message[:300]} (rerun with DUET_DEBUG=1 for the traceback)", 1
