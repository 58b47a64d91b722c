"""Helpers for tests that interrupt the duet processes they start."""

import signal


def default_sigint() -> None:
    """`preexec_fn` for a child that must get Ctrl-C: a shell ignores SIGINT in commands it runs in the
    background (`make test &`), the child would inherit that, and Python then installs no
    KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
