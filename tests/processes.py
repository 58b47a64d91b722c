"""Helpers for tests that start processes: interrupting them, and a free loopback port for them."""

import multiprocessing
import signal
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path


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


def run_ranks(target: Callable, args: list[tuple], wait: Iterable[int], seconds: float, out: Path) -> None:
    """Start one spawned process per `args` (rank r runs `target(*args[r])`), wait up to `seconds` in all for the
    ranks in `wait`, kill whatever still runs (ranks a test makes hang), and fail with the errors the ranks wrote
    to `out/rank{r}.err`."""
    context = multiprocessing.get_context("spawn")
    ranks = [context.Process(target=target, args=a) for a in args]
    for p in ranks:
        p.start()
    deadline = time.monotonic() + seconds
    for r in wait:
        ranks[r].join(max(0.0, deadline - time.monotonic()))
    for p in ranks:
        if p.is_alive():
            p.kill()
        p.join()
    errors = {r: (out / f"rank{r}.err").read_text() for r in range(len(args)) if (out / f"rank{r}.err").exists()}
    assert not errors, "\n".join(f"rank {r}:\n{e}" for r, e in errors.items())
