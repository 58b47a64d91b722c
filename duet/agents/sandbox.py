"""A sandbox for model-written Python: isolated, stateful like a notebook, and fast.

    from duet.agents.sandbox import Sandbox

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
   ``isolation="none"`` keeps the separate process, deadline and output caps, and nothing else.

Speed: sessions are forked from a per-process fork server (one per isolation mode, started on
first use and restarted if it dies) that has already imported sympy, so a warm step costs about a
millisecond instead of the ~0.5 s of a cold ``python -c "import sympy"``.

A run that kills its session (timeout, crash, ``os._exit``) reports why; the next run starts a
fresh session and says, with ``state_lost=True`` and a note on stderr, that earlier state is gone.
Each Sandbox is thread-safe (runs are serialised); separate Sandboxes run in parallel.
"""

from __future__ import annotations

import atexit
import codecs
import concurrent.futures
import dataclasses
import errno
import json
import os
import queue
import secrets
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Collection

from duet.agents import sandbox_isolation as iso
from duet.agents import sandbox_worker as worker

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

ISOLATION_LEVELS = ("bwrap", "landlock", "rlimits", "none")  # strongest first
SKIPPABLE_LAYERS = ("landlock", "seccomp", "uid")
DEFAULT_OUTPUT_LIMIT = 64 * 1024
_SERVER_START_TIMEOUT = 60.0  # importing sympy on a loaded machine can take seconds
_SESSION_START_TIMEOUT = 30.0
_KILL_GRACE = 3.0  # how long a session supervisor gets to clean up before SIGKILL
_WORKER_PATHS = (os.path.abspath(worker.__file__), os.path.abspath(iso.__file__))
# Capabilities the fork server keeps inside bubblewrap when we are root, to build each session's
# namespaces and hand it its own uid. Sessions drop all of them before running any code.
_ROOT_SERVER_CAPS = ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_KILL",
                     "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER")
_CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start, bad configuration); not an error in the code run."""


class SandboxUnavailable(SandboxError):
    """The requested isolation level is not available on this machine."""


@dataclasses.dataclass
class RunResult:
    """The outcome of one Sandbox.run.

    ok is True when the code ran to the end without raising (and its session survived). error is
    None or one line: the exception's last line ("ZeroDivisionError: division by zero"), "timed
    out after 5 s", "memory limit 1024 MB exceeded", "session crashed: SIGSEGV (...)", or, when
    the code succeeded but printed too much, "output truncated at 64 KB" (then ok stays True and
    truncated is True). seconds is the wall time of the run itself, session start excluded.
    state_lost is True on the first run of a fresh session that replaced one that died.
    """

    stdout: str
    stderr: str
    error: str | None
    ok: bool
    seconds: float
    state_lost: bool = False
    truncated: bool = False


# ---------------------------------------------------------------------------------------------- probing
_probe_lock = threading.Lock()
_probe_cache: dict | None = None


def _probe() -> dict:
    """What this machine offers, found out once per process (runs bubblewrap once, ~50 ms)."""
    global _probe_cache
    with _probe_lock:
        if _probe_cache is None:
            posix = os.name == "posix" and hasattr(os, "fork")
            abi = iso.landlock_abi()
            info = {
                "posix": posix,
                "linux": iso.IS_LINUX,
                "root": posix and os.geteuid() == 0,
                "landlock_abi": abi,
                "seccomp": iso.seccomp_available(),
                "pidfd": iso.pidfd_available(),
            }
            info["bwrap"], info["bwrap_detail"] = _probe_bwrap(info)
            _probe_cache = info
        return _probe_cache


def _probe_bwrap(info: dict) -> tuple[bool, str]:
    if not info["linux"]:
        return False, "Linux only"
    path = shutil.which("bwrap")
    if path is None:
        return False, "bubblewrap not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    if not info["pidfd"]:
        return False, "kernel lacks pidfd_open (Linux >= 5.3 needed to signal sessions in their namespace)"
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        argv = _bwrap_argv(path) + ["--", sys.executable, "-I", "-B", f"{worker.SANDBOX_DIR}/sandbox_worker.py",
                                    "probe"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=_CLEAN_ENV)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"bubblewrap failed to run: {e}"
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {"ok": False, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    if not result.get("ok"):
        return False, f"{version or 'bubblewrap'} cannot build a session here: {result.get('error')}"
    return True, f"{version}: no network, read-only system, private PID/mount/IPC namespaces per session"


def chosen_isolation() -> str:
    """The isolation level ``isolation="auto"`` resolves to on this machine."""
    info = _probe()
    if not info["posix"]:
        raise SandboxUnavailable("the sandbox needs a POSIX system with fork()")
    if info["bwrap"]:
        return "bwrap"
    if info["landlock_abi"] > 0 or info["seccomp"]:
        return "landlock"
    return "rlimits"


def describe_isolation() -> list[dict]:
    """Each layer: name, whether it is available here, whether "auto" uses it, and a one-line detail."""
    info = _probe()
    chosen = chosen_isolation() if info["posix"] else "none"
    abi = info["landlock_abi"]
    stacked = chosen in ("bwrap", "landlock")
    if info["linux"]:
        process = "separate -I process, empty env, temp work dir, rlimits, deadline, group kill, 64 KB output caps"
        if info["root"]:
            process += "; as root each session gets its own unprivileged uid"
        else:
            process += "; alone it does not stop reading your files or signalling your processes"
    elif info["posix"]:
        process = ("separate process, empty env, temp work dir, CPU/file/process rlimits, deadline, output caps; "
                   "NOT isolated: memory limit, filesystem, network")
    else:
        process = "unavailable: needs a POSIX system with fork()"
    if abi >= 6:
        landlock = f"ABI {abi}: read-only system, write only the work dir, no TCP, signals scoped to the session"
    elif abi >= 4:
        landlock = f"ABI {abi}: read-only system, write only the work dir, no TCP (no signal scoping before ABI 6)"
    elif abi > 0:
        landlock = f"ABI {abi}: read-only system, write only the work dir (no TCP rules before ABI 4)"
    else:
        landlock = "not available in this kernel (Linux >= 5.13 with landlock in the LSM list)"
    if info["seccomp"]:
        seccomp = "BPF filter: no inet sockets, ptrace, mount, unshare, setns, bpf, io_uring; ancestors unsignalable"
    else:
        seccomp = "not available (needs Linux on x86_64 or aarch64)"
    return [
        {"name": "rlimits", "available": info["posix"], "used": chosen != "none", "detail": process},
        {"name": "bwrap", "available": info["bwrap"], "used": chosen == "bwrap", "detail": info["bwrap_detail"]},
        {"name": "landlock", "available": abi > 0, "used": stacked and abi > 0, "detail": landlock},
        {"name": "seccomp", "available": info["seccomp"], "used": stacked and info["seccomp"], "detail": seccomp},
    ]


def _resolve(isolation: str) -> str:
    if isolation == "auto":
        return chosen_isolation()
    if isolation not in ISOLATION_LEVELS:
        raise ValueError(f"isolation must be 'auto' or one of {ISOLATION_LEVELS}, not {isolation!r}")
    info = _probe()
    if not info["posix"]:
        raise SandboxUnavailable("the sandbox needs a POSIX system with fork()")
    if isolation == "bwrap" and not info["bwrap"]:
        raise SandboxUnavailable(f"isolation='bwrap' is unavailable: {info['bwrap_detail']}")
    if isolation == "landlock" and not (info["landlock_abi"] > 0 or info["seccomp"]):
        raise SandboxUnavailable("isolation='landlock' is unavailable: neither Landlock nor seccomp in this kernel")
    return isolation


# ------------------------------------------------------------------------------------------ fork server
def _bwrap_argv(bwrap: str) -> list[str]:
    """bubblewrap for the fork server: no network, only the system and the interpreter, read-only."""
    argv = [bwrap]
    if os.geteuid() == 0:
        # Everything --unshare-all does except the user namespace: inside one, real root could only
        # map uid 0, and uid 0 is exempt from RLIMIT_NPROC. Outside one, the server can give each
        # session its own uid; it keeps just the capabilities needed for that.
        argv += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                 "--cap-drop", "ALL"]
        for cap in _ROOT_SERVER_CAPS:
            argv += ["--cap-add", cap]
    else:
        argv += ["--unshare-all"]
    argv += ["--die-with-parent", "--new-session", "--hostname", "sandbox",
             "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--ro-bind", "/usr", "/usr"]
    for path in worker.SYSTEM_PATHS[1:]:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    for path in worker.ETC_FILES:
        if os.path.exists(path):
            argv += ["--ro-bind", path, path]
    created: set[str] = set()
    for root in worker.python_roots():
        if root == "/usr" or root.startswith("/usr/"):
            continue
        # Parents bwrap would create copy restrictive host modes (/root is 0700): make them
        # traversable so a session's unprivileged uid reaches the interpreter (needs bwrap >= 0.5).
        parent, parents = os.path.dirname(root), []
        while parent not in ("/", "") and parent not in created:
            parents.append(parent)
            parent = os.path.dirname(parent)
        for path in reversed(parents):
            argv += ["--perms", "0755", "--dir", path]
            created.add(path)
        argv += ["--ro-bind", root, root]
    for path in _WORKER_PATHS:
        argv += ["--ro-bind", path, f"{worker.SANDBOX_DIR}/{os.path.basename(path)}"]
    argv += ["--chdir", "/tmp"]
    return argv


class _Spawner:
    """Starts fork servers from one thread that lives as long as the process.

    bubblewrap's --die-with-parent (PR_SET_PDEATHSIG) fires when the *thread* that started it
    exits, so starting a server from a short-lived worker thread would kill it with that thread.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="duet-sandbox-spawner", daemon=True)
                self._thread.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((argv, kwargs, future))
        return future.result()

    def _loop(self) -> None:
        while True:
            argv, kwargs, future = self._jobs.get()
            try:
                future.set_result(subprocess.Popen(argv, **kwargs))
            except BaseException as e:  # noqa: BLE001 - hand any failure back to the caller
                future.set_exception(e)


_spawner = _Spawner()


class _ForkServer:
    """One fork server process (per isolation mode): has sympy imported, forks sessions on request."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.lock = threading.Lock()
        self.base_dir: str | None = None
        host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.channel = host
        try:
            if mode != "bwrap":
                self.base_dir = tempfile.mkdtemp(prefix="duet-sandbox-")
                if os.geteuid() == 0:
                    os.chmod(self.base_dir, 0o711)  # sessions' own uids reach their dir, but cannot list
            options = {"mode": mode, "channel_fd": child.fileno(), "base_dir": self.base_dir}
            script = _WORKER_PATHS[0]
            prefix: list[str] = []
            if mode == "bwrap":
                prefix = [*_bwrap_argv(shutil.which("bwrap") or "bwrap"), "--"]
                script = f"{worker.SANDBOX_DIR}/sandbox_worker.py"
            argv = [*prefix, sys.executable, "-I", "-B", script, "serve", json.dumps(options)]
            debug = os.environ.get("DUET_SANDBOX_DEBUG") == "1"
            self.process = _spawner.popen(
                argv, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=None if debug else subprocess.DEVNULL, env=_CLEAN_ENV,
                cwd=self.base_dir or "/", start_new_session=True,
            )
        except BaseException:
            host.close()
            self._remove_base_dir()
            raise
        finally:
            child.close()
        try:
            ready, _ = _recv_frame(self.channel, time.monotonic() + _SERVER_START_TIMEOUT)
        except (OSError, ValueError) as e:
            self.close()
            raise SandboxError(f"the {mode} fork server did not start: {e}") from e
        if not isinstance(ready, dict) or not ready.get("ready"):
            self.close()
            raise SandboxError(f"the {mode} fork server did not start: {ready!r}")
        self.info = ready

    def alive(self) -> bool:
        return self.process.poll() is None

    def spawn(self, request: dict, fds: list[int]) -> tuple[int, int | None]:
        """Fork a session; returns its supervisor's pid (in the server's namespace) and a pidfd."""
        data = _encode_frame(request)
        with self.lock:
            self.channel.settimeout(_SESSION_START_TIMEOUT)
            socket.send_fds(self.channel, [data], fds)
            reply, reply_fds = _recv_frame(self.channel, time.monotonic() + _SESSION_START_TIMEOUT)
        if not isinstance(reply, dict) or "pid" not in reply:
            for fd in reply_fds:
                os.close(fd)
            raise SandboxError(f"fork server refused the session: {reply!r}")
        return int(reply["pid"]), (reply_fds[0] if reply_fds else None)

    def close(self) -> None:
        self.channel.close()  # the server exits on EOF; in bwrap mode every session dies with it
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._remove_base_dir()

    def _remove_base_dir(self) -> None:
        # Only if empty: sessions can outlive their server, and their work dirs live in here.
        worker._remove_if_empty(self.base_dir)


_servers: dict[str, _ForkServer] = {}
_servers_lock = threading.Lock()


def _get_server(mode: str, replace: _ForkServer | None = None) -> _ForkServer:
    """The shared fork server for `mode`, started on first use and restarted when it died."""
    with _servers_lock:
        server = _servers.get(mode)
        if server is not None and (server is replace or not server.alive()):
            _servers.pop(mode)
            server.close()
            server = None
        if server is None:
            server = _servers[mode] = _ForkServer(mode)
        return server


def shutdown_servers() -> None:
    """Stop every fork server of this process (sessions of a bwrap server end with it)."""
    with _servers_lock:
        servers = list(_servers.values())
        _servers.clear()
    for server in servers:
        server.close()


atexit.register(shutdown_servers)


def _forget_after_fork() -> None:
    """In a forked child of the host, the parent's servers and spawner thread are not ours to use."""
    global _servers_lock, _spawner, _probe_lock
    _servers.clear()  # their channels are shared with the parent: never talk on them (or close them)
    _servers_lock = threading.Lock()
    _probe_lock = threading.Lock()
    _spawner = _Spawner()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


# -------------------------------------------------------------------------------------------- framing
def _encode_frame(obj: object) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack("!I", len(body)) + body


def _recv_frame(sock: socket.socket, deadline: float) -> tuple[object, list[int]]:
    """One frame (and fds sent with it) from a blocking socket, giving up at `deadline`."""
    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out waiting for the sandbox")
        return left

    sock.settimeout(remaining())
    head, fds, _flags, _addr = socket.recv_fds(sock, 4, 4)
    while 0 < len(head) < 4:
        sock.settimeout(remaining())
        head += sock.recv(4 - len(head))
    if len(head) < 4:
        raise ConnectionError("the sandbox closed the connection")
    (size,) = struct.unpack("!I", head)
    body = b""
    while len(body) < size:
        sock.settimeout(remaining())
        chunk = sock.recv(size - len(body))
        if not chunk:
            raise ConnectionError("the sandbox closed the connection")
        body += chunk
    return json.loads(body), fds


class _ProtocolError(Exception):
    """The worker sent something that is not a valid frame (the code in it can write to its socket)."""


class _FrameBuffer:
    """Collects frames from a non-blocking stream written by the worker, which is not trusted: a
    frame may not exceed `max_size` and must decode to a JSON object."""

    def __init__(self, max_size: int = 1 << 20) -> None:
        self.data = b""
        self.max_size = max_size

    def feed(self, chunk: bytes) -> list[dict]:
        self.data += chunk
        frames = []
        while len(self.data) >= 4:
            (size,) = struct.unpack("!I", self.data[:4])
            if size > self.max_size:
                raise _ProtocolError(f"frame of {size} bytes")
            if len(self.data) < 4 + size:
                break
            try:
                frame = json.loads(self.data[4:4 + size])
            except (ValueError, RecursionError) as e:
                raise _ProtocolError(str(e)) from None
            if not isinstance(frame, dict):
                raise _ProtocolError("frame is not an object")
            frames.append(frame)
            self.data = self.data[4 + size:]
        return frames


def _one_line(value: object, limit: int = 500) -> str | None:
    """An error string from the worker, made safe to show: one line, bounded length."""
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Collector:
    """One output stream of one run: keeps the first `limit` bytes, counts the rest, finds the sentinel."""

    def __init__(self, limit: int, sentinel: bytes) -> None:
        self.limit, self.sentinel = limit, sentinel
        self.kept = bytearray()
        self.total = 0
        self.tail = b""  # bytes that could be the start of the sentinel
        self.done = False
        self.eof = False

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        buf = self.tail + data
        end = buf.find(self.sentinel)
        if end >= 0:
            self._keep(buf[:end])
            self.tail, self.done = b"", True
            return
        hold = min(len(buf), len(self.sentinel) - 1)
        self._keep(buf[:len(buf) - hold])
        self.tail = buf[len(buf) - hold:]

    def _keep(self, data: bytes) -> None:
        self.total += len(data)
        room = self.limit - len(self.kept)
        if room > 0:
            self.kept += data[:room]

    def finish(self) -> None:
        self._keep(self.tail)
        self.tail = b""

    @property
    def truncated(self) -> bool:
        return self.total > self.limit

    def text(self) -> str:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        return decoder.decode(bytes(self.kept), final=not self.truncated)  # don't show a cut character


# -------------------------------------------------------------------------------------------- sessions
class _Session:
    """The host's handles on one live session: its sockets and pipes, and a pidfd of its supervisor."""

    def __init__(self, server: _ForkServer, request: dict) -> None:
        self.server = server
        ctrl, ctrl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        status_r, status_w = os.pipe()
        self.ctrl, self.out, self.err, self.status = ctrl, out_r, err_r, status_r
        self.pidfd: int | None = None
        self.report: dict | None = None
        self._status_buf = b""
        self.gone = False
        self.closed = False
        self.hello: dict = {}
        try:
            self.pid, self.pidfd = server.spawn(request, [ctrl_child.fileno(), out_w, err_w, status_w])
        except BaseException:
            self.close_fds()
            raise
        finally:
            ctrl_child.close()
            for fd in (out_w, err_w, status_w):
                os.close(fd)
        for fd in (out_r, err_r, status_r):
            os.set_blocking(fd, False)

    def read_status(self) -> None:
        """Consume what the supervisor wrote; EOF means the session (C and W) is gone."""
        while not self.gone:
            try:
                chunk = os.read(self.status, 4096)
            except BlockingIOError:
                return
            if not chunk:
                self.gone = True
                break
            self._status_buf += chunk
        for line in self._status_buf.splitlines():
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if self.report is None and isinstance(report, dict):
                self.report = report

    def check_alive(self) -> bool:
        if _readable([self.status], 0):
            self.read_status()
        return not self.gone and self.report is None

    def signal(self, sig: int) -> None:
        """Signal the supervisor C, which lives in the server's PID namespace: hence the pidfd."""
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            elif not self.gone and self.server.mode != "bwrap":
                os.kill(self.pid, sig)  # C is alive while its status pipe is open, so the pid is its own
        except (ProcessLookupError, OSError):
            pass

    def wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.gone:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if _readable([self.status], left):
                self.read_status()
        return True

    def terminate(self) -> None:
        """End the session for good: ask the supervisor to kill and reap everything, then make sure."""
        if not self.gone:
            self.signal(signal.SIGTERM)
            if not self.wait_gone(_KILL_GRACE):
                self.signal(signal.SIGKILL)
                self.wait_gone(_KILL_GRACE)

    def close(self) -> None:
        """Graceful end between runs: closing the socket makes an idle worker exit on its own."""
        if self.closed:
            return
        try:
            self.ctrl.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if not self.wait_gone(1.0):
            self.terminate()
        self.close_fds()
        workdir = self.hello.get("cwd")
        base = self.server.base_dir
        if base and isinstance(workdir, str) and os.path.dirname(workdir) == base and os.path.isdir(workdir):
            worker._remove_tree(workdir)  # the supervisor normally did this; it may have been SIGKILLed
        if base and not self.server.alive():
            worker._remove_if_empty(base)

    def close_fds(self) -> None:
        self.closed = True
        self.ctrl.close()
        for fd in (self.out, self.err, self.status, self.pidfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _readable(fds: list[int], timeout: float) -> list[int]:
    """The fds among `fds` that are readable (or hung up) within `timeout` seconds."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(max(0.0, timeout) * 1000)]


def _format_size(limit: int) -> str:
    return f"{limit // 1024} KB" if limit % 1024 == 0 else f"{limit} bytes"


def _signal_name(sig: int) -> str:
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    description = signal.strsignal(sig) if hasattr(signal, "strsignal") else None
    return f"{name} ({description})" if description else name


# -------------------------------------------------------------------------------------------- Sandbox
class Sandbox:
    """A stateful Python session for model-written code, isolated as strongly as this machine allows.

    timeout: wall-clock seconds per run; the session is killed when it is exceeded.
    memory_mb: address-space limit of the session process.
    isolation: "auto" (the strongest available), "bwrap", "landlock", "rlimits", or "none" (an
        explicit opt-out: still a separate process with a deadline and output caps, nothing else).
    output_limit: bytes kept per stream and run; the rest is drained and dropped.
    disk_mb: largest file the code may write (and, with bwrap, the size of its work dir).
    max_processes: processes and threads the session may have at once.
    max_open_files: file descriptors per process.
    skip_layers: stacked layers to leave out ("landlock", "seccomp", "uid"): for tests and diagnosis.

    Creating a Sandbox is cheap; its session starts with the first run (or start()).
    """

    def __init__(
        self,
        timeout: float = 5.0,
        memory_mb: int = 1024,
        isolation: str = "auto",
        *,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        disk_mb: int = 128,
        max_processes: int = 64,
        max_open_files: int = 256,
        skip_layers: Collection[str] = (),
    ) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        if memory_mb < 32 or disk_mb < 1 or max_processes < 2 or max_open_files < 16 or output_limit < 1:
            raise ValueError("memory_mb >= 32, disk_mb >= 1, max_processes >= 2, max_open_files >= 16 "
                             "and output_limit >= 1 are required")
        unknown = set(skip_layers) - set(SKIPPABLE_LAYERS)
        if unknown:
            raise ValueError(f"skip_layers: unknown {sorted(unknown)}; choose from {SKIPPABLE_LAYERS}")
        self.timeout = float(timeout)
        self.memory_mb = int(memory_mb)
        self.output_limit = int(output_limit)
        self.isolation = _resolve(isolation)
        self._limits = {"memory_mb": self.memory_mb, "disk_mb": int(disk_mb), "max_processes": int(max_processes),
                        "max_open_files": int(max_open_files), "output_limit": self.output_limit}
        self._layers = {name: name not in skip_layers for name in SKIPPABLE_LAYERS}
        self._lock = threading.RLock()
        self._session: _Session | None = None
        self._lost: str | None = None  # why the previous session died, until a run reports it
        self._closed = False
        self._pid = os.getpid()

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        session = getattr(self, "_session", None)
        if session is not None and not session.closed and getattr(self, "_pid", None) == os.getpid():
            session.close_fds()  # an idle worker exits on EOF; its supervisor cleans up

    def start(self) -> None:
        """Start the session now instead of on the first run."""
        self._adopt_after_fork()
        with self._lock:
            self._check_open()
            if self._session is None:
                self._start_session()

    def restart(self) -> None:
        """Replace the session with a fresh one (all state is dropped, on purpose: not reported as lost)."""
        self._adopt_after_fork()
        with self._lock:
            self._check_open()
            self._end_session()
            self._lost = None
            self._start_session()

    def close(self) -> None:
        """End the session and remove its work dir. Safe to call twice, and from another thread."""
        self._adopt_after_fork()
        self._closed = True
        if not self._lock.acquire(blocking=False):
            session = self._session
            if session is not None and not session.gone:
                session.signal(signal.SIGTERM)  # a run is in progress in another thread: cut it short
            self._lock.acquire()
        try:
            self._end_session()
        finally:
            self._lock.release()

    @property
    def layers(self) -> tuple[str, ...]:
        """The layers the current session actually runs under (empty before it starts)."""
        session = self._session
        return tuple(session.hello.get("layers", ())) if session else ()

    @property
    def session_info(self) -> dict:
        """What the current session's worker reported: pid, uid, work dir, limits, Landlock details."""
        session = self._session
        return dict(session.hello) if session else {}

    def _adopt_after_fork(self) -> None:
        """In a forked copy of the owning process, leave the session (and the lock, which another
        thread may have held at the fork) to the parent, and start afresh."""
        if self._pid != os.getpid():
            self._pid, self._lock, self._session, self._lost = os.getpid(), threading.RLock(), None, None

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxError("the sandbox is closed")


    def _start_session(self) -> None:
        request = {"op": "spawn", "limits": self._limits, "layers": self._layers}
        last_error: Exception | None = None
        for attempt in range(2):  # a dead or wedged fork server is replaced once
            server = _get_server(self.isolation)
            try:
                session = _Session(server, request)
            except (OSError, ValueError, SandboxError) as e:
                last_error = e
                if attempt == 0:
                    _get_server(self.isolation, replace=server)
                continue
            try:
                session.hello = self._await_hello(session)
            except SandboxError:
                session.terminate()
                session.close()
                raise
            self._session = session
            return
        raise SandboxError(f"could not start a sandbox session: {last_error}")

    def _await_hello(self, session: _Session) -> dict:
        frames = _FrameBuffer()
        deadline = time.monotonic() + _SESSION_START_TIMEOUT
        session.ctrl.setblocking(False)
        while time.monotonic() < deadline:
            ready = _readable([session.ctrl.fileno(), session.status], deadline - time.monotonic())
            if session.status in ready:
                session.read_status()
            if session.ctrl.fileno() in ready:
                try:
                    chunk = session.ctrl.recv(65536)
                except BlockingIOError:
                    chunk = None
                if chunk == b"":
                    break
                try:
                    received = frames.feed(chunk or b"")
                except _ProtocolError as e:
                    raise SandboxError(f"sandbox session failed to start: bad hello ({e})") from None
                for frame in received:
                    if frame.get("hello"):
                        return frame
                    raise SandboxError(f"sandbox session failed to start: {_one_line(frame.get('error'))}")
            if session.gone:
                break
        session.wait_gone(0.5)
        why = (session.report or {}).get("error") or "no reply from the session"
        raise SandboxError(f"sandbox session failed to start: {why}")

    def _end_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()

    # -- running ----------------------------------------------------------------------------------
    def run(self, code: str) -> RunResult:
        """Run `code` in the session (started on demand); never raises for errors in the code itself."""
        if not isinstance(code, str):
            raise TypeError("code must be a str")
        self._adopt_after_fork()
        with self._lock:
            self._check_open()
            if self._session is not None and not self._session.check_alive():
                self._session.read_status()
                self._lost = self._death_reason(self._session, timed_out=False) or "the session ended"
                self._end_session()
            if self._session is None:
                self._start_session()
            lost, self._lost = self._lost, None
            session = self._session
            assert session is not None
            try:
                result, died = self._exchange(session, code)
            except BaseException:
                self._lost = "the run was interrupted"
                session.terminate()
                self._end_session()
                raise
            if died:
                self._lost = result.error
                self._end_session()
            if died and self._closed:
                result.error = "the sandbox was closed during the run"
            if lost:
                result.state_lost = True
                result.stderr = (f"[sandbox] a fresh session started: the previous one ended ({lost}); "
                                 "variables, functions and imports from earlier runs are gone.\n") + result.stderr
            return result

    def _exchange(self, session: _Session, code: str) -> tuple[RunResult, bool]:
        """Send one run, drain both output pipes while waiting, enforce the deadline.

        Returns the result and whether the session is over (died, or ended itself after a MemoryError).
        """
        sentinel = secrets.token_hex(16)
        marker = b"\x00" + sentinel.encode() + b"\x00"
        out = _Collector(self.output_limit, marker)
        err = _Collector(self.output_limit, marker)
        frames = _FrameBuffer()
        reply: dict | None = None
        timed_out = broken = False
        start = time.monotonic()
        deadline = start + self.timeout
        request = _encode_frame({"op": "run", "code": code, "timeout": self.timeout, "sentinel": sentinel})
        try:
            session.ctrl.settimeout(self.timeout)
            session.ctrl.sendall(request)
        except OSError:
            pass  # a dead session is noticed below, a stuck one by the deadline
        session.ctrl.setblocking(False)
        with selectors.DefaultSelector() as sel:
            sel.register(session.out, selectors.EVENT_READ, out)
            sel.register(session.err, selectors.EVENT_READ, err)
            sel.register(session.ctrl.fileno(), selectors.EVENT_READ, "ctrl")
            sel.register(session.status, selectors.EVENT_READ, "status")
            while True:
                if reply is not None:
                    wanted = reply.get("sentinels", [False, False])
                    if all(c.done or c.eof or not w for c, w in zip((out, err), wanted, strict=False)):
                        break
                if session.gone or session.report is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                for key, _ in sel.select(left):
                    if key.data == "status":
                        session.read_status()
                        if session.gone:
                            sel.unregister(session.status)
                    elif key.data == "ctrl":
                        try:
                            chunk = session.ctrl.recv(65536)
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError:
                            chunk = b""
                        if not chunk:
                            sel.unregister(session.ctrl.fileno())
                            session.wait_gone(_KILL_GRACE)  # the worker is exiting: collect its report
                            continue
                        try:
                            # only the reply to *this* run counts (the cell itself can write to fd 3)
                            reply = next((f for f in frames.feed(chunk) if f.get("run") == sentinel), reply)
                        except _ProtocolError:
                            broken = True
                    else:
                        self._drain(key.fd, key.data, sel)
                if broken:
                    reply = None
                    break
        seconds = time.monotonic() - start
        died = timed_out or reply is None
        if died:
            session.terminate()  # kills and reaps everything the session started
            for fd, collector in ((session.out, out), (session.err, err)):
                self._drain_rest(fd, collector)
        for collector in (out, err):
            collector.finish()
        truncated = out.truncated or err.truncated or any((reply or {}).get("truncated", []))
        if died:
            error = "the session broke the sandbox protocol" if broken else self._death_reason(session, timed_out)
            ok = False
        else:
            assert reply is not None
            ok = bool(reply.get("ok"))
            error = _one_line(reply.get("error"))
            if error is None and truncated:
                error = f"output truncated at {_format_size(self.output_limit)}"
        result = RunResult(stdout=out.text(), stderr=err.text(), error=error, ok=ok, seconds=seconds,
                           truncated=truncated)
        return result, died or bool((reply or {}).get("session_ends"))

    @staticmethod
    def _drain(fd: int, collector: _Collector, sel: selectors.BaseSelector) -> None:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.EBADF:
                raise
            chunk = b""
        if chunk:
            collector.feed(chunk)
        else:
            collector.eof = True
            sel.unregister(fd)

    @staticmethod
    def _drain_rest(fd: int, collector: _Collector) -> None:
        """After the session is gone: take what is still in the pipe (bounded; writers are dead)."""
        deadline = time.monotonic() + 1.0
        while not collector.eof and time.monotonic() < deadline:
            if not _readable([fd], deadline - time.monotonic()):
                break
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                break
            collector.feed(chunk)

    def _death_reason(self, session: _Session, timed_out: bool) -> str:
        """One line saying why a session ended, from the supervisor's report."""
        if timed_out:
            return f"timed out after {self.timeout:g} s"
        report = session.report
        if report is None:
            return "the session ended unexpectedly"
        if report.get("error"):
            return str(report["error"])
        sig, cpu, rss = report.get("signal"), report.get("cpu") or 0.0, report.get("maxrss_mb") or 0.0
        if sig == getattr(signal, "SIGXCPU", None) or (sig == signal.SIGKILL and cpu >= worker.SESSION_CPU_BUDGET_S):
            return f"timed out after {self.timeout:g} s (CPU time limit)"
        if sig is not None and rss >= 0.75 * self.memory_mb:
            return f"memory limit {self.memory_mb} MB exceeded ({_signal_name(sig)})"
        if sig is not None:
            return f"session crashed: {_signal_name(sig)}"
        return f"session exited with status {report.get('exit')}"
