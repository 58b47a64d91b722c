"""Helpers for tests that start processes: interrupting them, and a free loopback port for them."""

import signal
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server or a process group a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_sigint() -> None:
    """`preexec_fn` for a child that must get Ctrl-C: a shell ignores SIGINT in commands it runs in the
    background (`make test &`), the child would inherit that, and Python then installs no
    KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
