"""A sandbox for model-written Python: isolated, stateful like a notebook, and fast (see session.py).

The host side: session.py (Sandbox, RunResult) and servers.py (isolation probing, fork servers).
The sandboxed side, standard library only: worker.py (fork server and session supervisor),
confine.py, repl.py and processes.py (the worker process), isolation.py (kernel primitives).
Both sides: framing.py (the frames on the control sockets) and limits.py (every fixed limit).
"""

from duet.sandbox.servers import (
    ISOLATION_LEVELS,
    SandboxError,
    SandboxUnavailable,
    chosen_isolation,
    describe_isolation,
    shutdown_servers,
)
from duet.sandbox.session import RunResult, Sandbox

__all__ = [
    "ISOLATION_LEVELS",
    "RunResult",
    "Sandbox",
    "SandboxError",
    "SandboxUnavailable",
    "chosen_isolation",
    "describe_isolation",
    "shutdown_servers",
]
