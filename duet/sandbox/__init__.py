"""A sandbox for model-written Python: isolated, stateful like a notebook, and fast.

    from duet.sandbox import Sandbox

    with Sandbox(timeout=5.0, memory_mb=1024) as sb:
        r = sb.run("x = 6 * 7")
        r = sb.run("x + 1")          # r.stdout == "43\\n", r.ok, r.error is None

Code runs in a separate, forked worker process, never in the caller's. Protection comes in
layers, each detected at run time (describe_isolation() says what this machine offers):

1. rlimits (always): a separate process started with ``-I`` and an empty environment, a fresh
   temporary work dir, its own session, rlimits (CPU, address space, file size, open files,
   processes, no core), a wall-clock deadline after which the whole session is killed and reaped,
   and stdout/stderr drained concurrently and capped. As root, each session runs under its own
   unprivileged uid, because RLIMIT_NPROC is not enforced for uid 0.
2. bwrap (Linux with user namespaces and bubblewrap): the fork server runs inside bubblewrap with
   no network, a read-only view of only the system and the interpreter, and private PID, IPC and
   UTS namespaces; each session further gets its own PID, mount, IPC and network namespaces and a
   private tmpfs /tmp with the work dir /tmp/work, so nothing it starts survives it and it sees no
   other session.
3. landlock + seccomp (Linux, stacked on the above in every session process): Landlock allows
   reading only the system and the interpreter, writing only the work dir, no TCP, and no signals
   outside the session; a seccomp filter refuses inet sockets, ptrace, mount, unshare, setns, bpf,
   io_uring and signals to the session's ancestors. This holds where namespaces are unavailable.
4. Elsewhere (macOS) only layer 1 applies, and the memory limit is not enforced there.

Across layers: the host's control socket goes to a relay process that never runs a cell (relay.py):
it checks the worker's result field by field and stops every process of the session (SIGSTOP)
before it reports, so nothing of a session runs between runs and a cell cannot end its run early
and keep going. memory_mb bounds the whole session (every process, memfd and tmpfs page) where
the host can make a memory cgroup (cgroups.py; v2 memory.max, else v1), else each process only.
As root, no capability survives into a session at any level, and without bwrap each session also
gets a private network namespace and a mount view where /root (any directory its uid cannot
enter on the way to the interpreter) holds only the interpreter.
   ``isolation="none"`` keeps the separate process, deadline and output caps, and nothing else.

Speed: sessions are forked from a per-process fork server (one per isolation mode, started on
first use and restarted if it dies) that has already imported sympy, so a warm step costs about a
millisecond instead of the ~0.5 s of a cold ``python -c "import sympy"``.

A run that kills its session (timeout, crash, ``os._exit``) reports why; the next run starts a
fresh session and says, with ``state_lost=True`` and a note on stderr, that earlier state is gone.
Each Sandbox is thread-safe (runs are serialised); separate Sandboxes run in parallel.

Modules. The host side: session.py (Sandbox, RunResult), servers.py (isolation probing, fork servers)
and cgroups.py (the per-session memory cgroup).
The sandboxed side, standard library only: worker.py (fork server and session supervisor),
relay.py (the session's relay), confine.py, repl.py and processes.py (the worker process),
isolation.py (kernel primitives).
Both sides: framing.py (the frames on the control sockets) and limits.py (every fixed limit).
"""

from duet.sandbox.results import RunResult
from duet.sandbox.servers import (
    ISOLATION_LEVELS,
    SandboxError,
    SandboxUnavailable,
    chosen_isolation,
    describe_isolation,
    shutdown_servers,
)
from duet.sandbox.session import Sandbox

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
