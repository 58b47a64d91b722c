"""The host's side of the fork servers: what isolation this machine offers, and one server per mode.

A fork server (worker.py serve) is started on first use, inside bubblewrap when that is the mode,
and restarted if it dies; sessions are forked from it on request.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from duet.sandbox import framing, limits, processes, worker
from duet.sandbox import isolation as iso

ISOLATION_LEVELS = ("bwrap", "landlock", "rlimits", "none")  # strongest first
_WORKER_PATHS = tuple(os.path.join(os.path.dirname(os.path.abspath(worker.__file__)), f"{name}.py")
                      for name in worker.WORKER_MODULES)
# Capabilities the fork server keeps inside bubblewrap when we are root, to build each session's
# namespaces and hand it its own uid. Sessions drop all of them before running any code.
_ROOT_SERVER_CAPS = ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_KILL",
                     "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER")
_CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start, bad configuration); not an error in the code run."""


class SandboxUnavailable(SandboxError):
    """The requested isolation level is not available on this machine."""



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
        argv = _bwrap_argv(path) + ["--", sys.executable, "-I", "-B", f"{limits.SANDBOX_DIR}/worker.py",
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
        process = ("separate -I process, empty env, temp work dir, rlimits, deadline, 64 KB output caps, "
                   "every process of the session stopped between runs")
        if info["root"]:
            process += ("; as root each session gets its own unprivileged uid with no capability, a private "
                        "network namespace, and /root (or any dir that uid cannot enter) hidden")
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
    from duet.sandbox import cgroups

    has_cgroup, memory = cgroups.describe_memory_bound() if info["linux"] else (False, "per process only (rlimits)")
    return [
        {"name": "rlimits", "available": info["posix"], "used": chosen != "none", "detail": process},
        {"name": "memory", "available": has_cgroup, "used": has_cgroup and chosen != "none", "detail": memory},
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
        argv += ["--ro-bind", path, f"{limits.SANDBOX_DIR}/{os.path.basename(path)}"]
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
                script = f"{limits.SANDBOX_DIR}/worker.py"
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
            ready, _ = framing.recv_frame_until(self.channel, time.monotonic() + limits.SERVER_START_TIMEOUT_S)
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
        data = framing.encode_frame(request)
        with self.lock:
            self.channel.settimeout(limits.SESSION_START_TIMEOUT_S)
            socket.send_fds(self.channel, [data], fds)
            reply, reply_fds = framing.recv_frame_until(self.channel, time.monotonic() + limits.SESSION_START_TIMEOUT_S)
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
        processes.remove_if_empty(self.base_dir)


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
