"""Errors that reach the user as one line (the CLI prints `error: <message>` and exits non-zero)."""


class DuetError(Exception):
    """Base class: a user-facing error whose message says what is wrong and what to do."""


class ConfigError(DuetError):
    """A checkpoint's config.json holds a value duet cannot run."""


class CheckpointError(DuetError):
    """A checkpoint directory is missing, incomplete or corrupt."""
