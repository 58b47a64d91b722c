"""The sandboxed side of duet's sandbox: fork server, session supervisor and the REPL worker.

The host (duet/agents/sandbox.py) starts one fork server per isolation mode and process:

    python -I -B sandbox_worker.py serve '<options json>'        (inside bubblewrap when available)

The fork server imports the heavy modules once (sympy, ...) and then, for every session the host
asks for, forks this chain (the host holds a pidfd of C and talks to W over its own socket):

    fork server ─ C  session supervisor: own session, optional namespaces, work dir, cleanup
                  └ I  (bwrap mode only) PID 1 of the session's private PID namespace
                      └ W  the worker: limits, privileges dropped, Landlock, seccomp, then a REPL

W runs model-written code; C and I never do. W reports every run on its control socket and writes
a per-run sentinel on stdout/stderr so the host knows the output of that run is complete. Whoever
reaps W (C, or I in bwrap mode) writes one JSON line describing how W ended on the status pipe;
the host treats EOF on that pipe as "the session is gone".

Standard library only: inside bubblewrap the duet package is not importable, only this file and
sandbox_isolation.py are bound into /opt/duet-sandbox.
"""

from __future__ import annotations

import ast
import builtins
import ctypes
import errno
import fcntl
import gc
import io
import json
import linecache
import math
import os
import resource
import select
import signal
import socket
import struct
import sys
import tempfile
import traceback
import types

if __package__:
    from . import sandbox_isolation as iso
else:  # run as a script: import the sibling file, then stop exposing this directory to user code
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sandbox_isolation as iso

    sys.path.pop(0)

PRELOAD = ("math", "fractions", "itertools", "functools", "collections", "decimal", "statistics", "sympy")
SANDBOX_DIR = "/opt/duet-sandbox"  # where bubblewrap binds this file and sandbox_isolation.py
SESSION_CPU_BUDGET_S = 3600  # hard RLIMIT_CPU per session; the per-run soft limit is re-armed each run
SESSION_UID_BASE, SESSION_UID_SPAN = 1_500_000_000, 400_000_000  # as root: one unprivileged uid per session
EXIT_SETUP_FAILED = 70

# The worker's own references: a cell that monkey-patches os._exit cannot keep the worker alive.
_hard_exit = os._exit

# W's file descriptors: stdin /dev/null, 1/2 the run's output pipes, 3 control socket,
# 4/5 private copies of the output pipes, restored on 1/2 after every run.
_CTRL_FD, _SAVED_OUT_FD, _SAVED_ERR_FD = 3, 4, 5


# ------------------------------------------------------------------------------------------------ frames
def send_frame(fd: int, obj: object, sock: socket.socket | None = None, fds: list[int] | None = None) -> None:
    """Write one length-prefixed JSON frame; with `sock` and `fds`, pass the fds along (SCM_RIGHTS)."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    data = struct.pack("!I", len(body)) + body
    if sock is not None and fds:
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(fd: int, sock: socket.socket | None = None) -> tuple[object, list[int]] | None:
    """Read one frame (and any fds sent with it); None at EOF."""
    fds: list[int] = []
    if sock is not None:
        head, fds, _flags, _addr = socket.recv_fds(sock, 4, 16)
        if len(head) < 4:
            rest = _read_exactly(fd, 4 - len(head)) if head else None
            if rest is None:
                return None
            head += rest
    else:
        head = _read_exactly(fd, 4)
        if head is None:
            return None
    (size,) = struct.unpack("!I", head)
    body = _read_exactly(fd, size)
    if body is None:
        return None
    return json.loads(body), fds


def _write_status(fd: int, obj: dict) -> None:
    try:
        os.write(fd, json.dumps(obj).encode() + b"\n")
    except OSError:
        pass  # the host is gone; nobody to tell


# ------------------------------------------------------------------------------------------- fork server
def serve(options: dict) -> None:
    """Preload modules, then fork one session per request on the host's channel until it closes."""
    channel_fd = options["channel_fd"]
    channel = socket.socket(fileno=channel_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the supervisors we fork are reaped automatically
    if iso.IS_LINUX:
        iso.set_parent_death_signal(signal.SIGKILL)
        iso.prctl(iso.PR_SET_DUMPABLE, 0)  # sessions cannot read our memory through /proc
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass  # an interpreter without sympy still gets a working, if colder, sandbox
    if "sympy" in sys.modules:
        _warm_sympy()
    tempfile.tempdir = None
    gc.collect()
    gc.freeze()  # keep forked sessions from dirtying the shared heap on their first collection
    env = _describe_environment(options)
    send_frame(channel_fd, {"ready": True, **env})
    uid_counter = int.from_bytes(os.urandom(4), "little")
    while True:
        try:
            got = recv_frame(channel_fd, channel)
        except (OSError, ValueError):
            got = None
        if got is None:
            _remove_if_empty(options.get("base_dir"))  # else the last session supervisor removes it
            os._exit(0)
        request, fds = got
        if not isinstance(request, dict) or request.get("op") != "spawn" or len(fds) != 4:
            for fd in fds:
                os.close(fd)
            send_frame(channel_fd, {"error": "bad request"})
            continue
        uid_counter += 1
        session_uid = SESSION_UID_BASE + uid_counter % SESSION_UID_SPAN
        pid = os.fork()
        if pid == 0:
            _session_supervisor(options, env, request, fds, session_uid)  # never returns
        for fd in fds:
            os.close(fd)
        reply_fds = []
        if iso.IS_LINUX and env["pidfd"]:
            try:
                reply_fds.append(iso.pidfd_open(pid))
            except OSError:
                pass  # already gone: the host will see EOF on the status pipe
        send_frame(channel_fd, {"pid": pid}, channel, reply_fds)
        for fd in reply_fds:
            os.close(fd)


def _warm_sympy() -> None:
    import sympy

    x = sympy.Symbol("x")
    sympy.simplify((x**2 - 1) / (x - 1))
    sympy.sympify("sqrt(8) + Rational(1, 3)")


def _describe_environment(options: dict) -> dict:
    """What the fork server can offer its sessions; also sent to the host as the ready message."""
    vm_mb = 0.0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    vm_mb = int(line.split()[1]) / 1024
    except OSError:
        vm_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # macOS reports bytes
    return {
        "pid": os.getpid(),
        "euid": os.geteuid(),
        "vm_mb": round(vm_mb, 1),
        "python": sys.version.split()[0],
        "landlock_abi": iso.landlock_abi(),
        "seccomp": iso.seccomp_available(),
        "pidfd": iso.pidfd_available(),
        "read_paths": _read_paths(),
    }


SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives",
             "/etc/passwd", "/etc/group", "/etc/nsswitch.conf")
DEVICES = ("/dev/zero", "/dev/urandom", "/dev/random")


def python_roots() -> list[str]:
    """The directories this interpreter needs: its prefixes and the sys.path entries inside them.

    sys.path entries outside the prefixes are left out on purpose: an editable install or a .pth
    file can point at the project directory, which sessions must not see.
    """
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    prefixes |= {os.path.realpath(p) for p in prefixes}
    roots = set(prefixes)
    for entry in sys.path:
        real = os.path.realpath(entry) if entry else ""
        if real and any(real == p or real.startswith(p.rstrip("/") + "/") for p in prefixes):
            roots.add(real)
    # Keep only outermost directories, so bind mounts and rules don't nest.
    ordered = sorted(r for r in roots if os.path.isdir(r))
    return [r for r in ordered if not any(r != o and r.startswith(o.rstrip("/") + "/") for o in ordered)]


def _read_paths() -> list[str]:
    """What a session may read under Landlock: the system, this interpreter, its own /proc."""
    return sorted(set(SYSTEM_PATHS + ETC_FILES + DEVICES + ("/proc", "/sys/devices/system/cpu"))
                  | set(python_roots()))


# ------------------------------------------------------------------------------------ session: supervisor
def _termination_pipe() -> int:
    """Make SIGTERM (the host ending the session) readable on a pipe, instead of an exception that
    could land anywhere: returns the read end, for _watch_child to poll."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the wakeup byte is what matters
    return read


def _session_plan(options: dict, env: dict, request: dict, session_uid: int) -> dict:
    """Decide, once, how this session is confined (C, I and W all follow the same plan)."""
    mode = options["mode"]
    layers = request.get("layers", {})
    confined = mode != "none"
    root = env["euid"] == 0
    pidns = mode == "bwrap"
    drop_uid = confined and root and iso.IS_LINUX and layers.get("uid", True)
    landlock_abi = env["landlock_abi"] if confined and mode in ("bwrap", "landlock") else 0
    landlock = landlock_abi > 0 and layers.get("landlock", True)
    seccomp = confined and mode in ("bwrap", "landlock") and env["seccomp"] and layers.get("seccomp", True)
    scope = landlock and landlock_abi >= 6
    # How the session's stray processes are found and killed: kill(-1) is only safe when it can
    # reach nothing but this session (own PID namespace, own uid, or a Landlock signal scope).
    if pidns or drop_uid or scope:
        sweep = "kill-all"
    elif iso.IS_LINUX:
        sweep = "proc-scan"
    else:
        sweep = "process-group"
    return {
        "mode": mode,
        "confined": confined,
        "pidns": pidns,
        "userns": pidns and not root,
        "uid": session_uid if drop_uid else os.geteuid(),
        "gid": session_uid if drop_uid else os.getegid(),
        "drop_uid": drop_uid,
        "landlock": landlock,
        "landlock_abi": landlock_abi if landlock else 0,
        "scope": scope,
        "seccomp": seccomp,
        "sweep": sweep,
        "limits": request.get("limits", {}),
        "base_dir": options.get("base_dir"),
        "server_pid": env["pid"],
        "read_paths": env["read_paths"],
    }


def _session_supervisor(options: dict, env: dict, request: dict, fds: list[int], session_uid: int) -> None:
    """Process C. Owns the session: sets up its namespaces or work dir, reaps W, cleans up, exits."""
    ctrl, out, err, status = fds
    code = 0
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _close_fds_except({0, ctrl, out, err, status})
        terminate = _termination_pipe()
        plan = _session_plan(options, env, request, session_uid)
        if iso.IS_LINUX:
            iso.set_process_name("duet-session")
            iso.set_child_subreaper()  # W's orphans come back to us, so cleanup can find them all
        if plan["pidns"]:
            _enter_session_namespaces(plan)
            # A folder of the private /tmp, so an interpreter kept under /tmp (a checkout there) is not
            # in the listing of the work dir.
            workdir = "/tmp/work"
            os.makedirs(workdir, mode=0o700, exist_ok=True)
            if plan["drop_uid"]:
                os.chown(workdir, plan["uid"], plan["gid"])
        else:
            workdir = tempfile.mkdtemp(prefix="s-", dir=plan["base_dir"])
            if plan["drop_uid"]:
                os.chown(workdir, plan["uid"], plan["gid"])
            if plan["sweep"] == "kill-all" and plan["scope"] and not plan["drop_uid"]:
                # A signal-scope-only domain around the session, so our own kill(-1) in cleanup
                # reaches only our descendants (W nests its stricter domain inside this one).
                iso.restrict_landlock([], [], abi=plan["landlock_abi"], filesystem=False, deny_tcp=False)
        plan["workdir"] = workdir
        child = _fork_tied()
        if child == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.close(terminate)
            if plan["pidns"]:
                _session_init(plan, ctrl, out, err, status)
            else:
                _worker(plan, ctrl, out, err, status)
            os._exit(EXIT_SETUP_FAILED)  # not reached
        plan["worker_pid"] = child
        for fd in (ctrl, out, err):
            os.close(fd)
        wait_status, usage, reason = _watch_child(child, status, terminate)
        if not plan["pidns"]:  # (with a PID namespace, I reports and the kernel does the cleanup)
            signal.alarm(20)  # cleanup must never hang the session's end
            _kill_descendants(plan)
            _remove_tree(workdir)
            if os.getppid() != plan["server_pid"]:  # the fork server is gone: the last one out tidies up
                _remove_if_empty(plan["base_dir"])
            _write_status(status, _exit_report(wait_status, usage, reason))
    except BaseException as e:  # noqa: BLE001 - report anything, then exit without Python's shutdown
        _write_status(status, {"error": f"session supervisor: {type(e).__name__}: {e}"})
        code = EXIT_SETUP_FAILED
    os._exit(code)


def _close_fds_except(keep: set[int]) -> None:
    """Close every inherited fd we don't need: above all the fork server's channel to the host."""
    try:
        open_fds = sorted(int(n) for n in os.listdir("/proc/self/fd" if iso.IS_LINUX else "/dev/fd"))
    except OSError:
        open_fds = list(range(resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
    for fd in open_fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _enter_session_namespaces(plan: dict) -> None:
    """Private PID, mount, IPC and network namespaces, a private tmpfs /tmp (the work dir) and /dev/shm."""
    flags = iso.CLONE_NEWPID | iso.CLONE_NEWNS | iso.CLONE_NEWIPC | iso.CLONE_NEWNET
    uid, gid = os.geteuid(), os.getegid()
    if plan["userns"]:
        flags |= iso.CLONE_NEWUSER  # unprivileged: gives us the right to mount, and a per-session NPROC count
    iso.unshare(flags)
    if plan["userns"]:
        # Our /proc/self files belong to root while we are non-dumpable (inherited from the fork
        # server), so the id maps could not be written: dumpable just for this.
        iso.prctl(iso.PR_SET_DUMPABLE, 1)
        iso.map_own_ids_in_new_userns(uid, gid)
        iso.prctl(iso.PR_SET_DUMPABLE, 0)
    iso.mount("none", "/", None, iso.MS_REC | iso.MS_PRIVATE)
    disk_mb = int(plan["limits"].get("disk_mb", 128))
    owner = f"uid={plan['uid']},gid={plan['gid']}"
    # An interpreter installed under /tmp (a CI checkout there, say) must survive the new /tmp.
    under_tmp = [r for r in python_roots() if r.startswith("/tmp/")]
    keep = [(root, os.open(root, os.O_PATH | os.O_CLOEXEC)) for root in under_tmp]
    iso.mount("tmpfs", "/tmp", "tmpfs", iso.MS_NOSUID | iso.MS_NODEV,
              f"size={disk_mb}m,nr_inodes={max(1024, disk_mb * 64)},mode=0700,{owner}")
    for root, fd in keep:
        os.makedirs(root, exist_ok=True)
        iso.mount(f"/proc/self/fd/{fd}", root, None, iso.MS_BIND | iso.MS_REC)
        os.close(fd)
    if os.path.isdir("/dev/shm"):
        iso.mount("tmpfs", "/dev/shm", "tmpfs", iso.MS_NOSUID | iso.MS_NODEV | iso.MS_NOEXEC,
                  f"size={max(1, disk_mb // 4)}m,mode=0700,{owner}")


def _session_init(plan: dict, ctrl: int, out: int, err: int, status: int) -> None:
    """Process I: PID 1 of the session's namespace. Its exit makes the kernel kill everything in it.

    It dies with C (forked by _fork_tied), so killing C is enough to end the whole session.
    """
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)  # PID 1 ignores default-action signals from inside
        iso.mount("proc", "/proc", "proc", iso.MS_NOSUID | iso.MS_NODEV | iso.MS_NOEXEC)
        child = _fork_tied()
        if child == 0:
            _worker(plan, ctrl, out, err, status)
        for fd in (ctrl, out, err):
            os.close(fd)
        wait_status, usage, reason = _watch_child(child, status)
        _write_status(status, _exit_report(wait_status, usage, reason))
    except BaseException as e:  # noqa: BLE001
        _write_status(status, {"error": f"session init: {type(e).__name__}: {e}"})
    os._exit(0)


_lifelines: list[int] = []


def _fork_tied() -> int:
    """fork(), where the child gets SIGKILL when this process dies, with no window in between.

    PR_SET_PDEATHSIG only covers deaths after it is set, so the child then checks a pipe whose
    write end only the parent holds: a hang-up means the parent is already gone.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write)
        if iso.IS_LINUX:
            iso.set_parent_death_signal(signal.SIGKILL)
            poller = select.poll()
            poller.register(read, 0)
            if poller.poll(0):
                os._exit(0)
        os.close(read)
        return 0
    os.close(read)
    _lifelines.append(write)  # held open until we exit
    return pid


def _watch_child(pid: int, status: int, terminate: int | None = None) -> tuple[int | None, object, str]:
    """Wait for `pid` to exit; kill it first when `terminate` becomes readable (the host's SIGTERM)
    or the host goes away (the status pipe lost its reader). Returns (wait status, rusage, reason)."""
    reason = "exited"
    pidfd = None
    if iso.IS_LINUX:
        try:
            pidfd = iso.pidfd_open(pid)
        except OSError:
            pidfd = None
    poller = select.poll()
    poller.register(status, 0)  # POLLERR arrives when the host's end is closed
    if terminate is not None:
        poller.register(terminate, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    try:
        while reason == "exited":
            for fd, _ev in poller.poll(None if pidfd is not None else 200):  # no pidfd: poll wait4 (macOS)
                if fd == status:
                    reason = "host gone"
                elif fd == terminate:
                    reason = "killed"
            done, wait_status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                return wait_status, usage, "exited"
        _ignore_errors(os.kill, pid, signal.SIGKILL)
        try:
            _, wait_status, usage = os.wait4(pid, 0)
        except ChildProcessError:
            return None, None, reason
        return wait_status, usage, reason
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _exit_report(wait_status: int | None, usage: object, reason: str) -> dict:
    report: dict = {"reason": reason, "exit": None, "signal": None}
    if wait_status is not None:
        if os.WIFSIGNALED(wait_status):
            report["signal"] = os.WTERMSIG(wait_status)
        else:
            report["exit"] = os.waitstatus_to_exitcode(wait_status)
    if usage is not None:
        report["cpu"] = round(usage.ru_utime + usage.ru_stime, 3)
        report["maxrss_mb"] = round(usage.ru_maxrss / (1024 if iso.IS_LINUX else 1 << 20), 1)
    return report


def _kill_descendants(plan: dict, *, self_is_worker: bool = False) -> None:
    """SIGKILL every process this session started (except the caller), then reap them all.

    The caller is a subreaper (C or W), so every orphan of the session ends up as its child.
    """
    how = plan["sweep"]
    if how == "kill-all" and plan["drop_uid"] and not self_is_worker:
        helper = os.fork()  # C stays root (to remove the work dir); a helper takes the session's uid
        if helper == 0:
            try:
                os.setgroups([])
                os.setresgid(plan["gid"], plan["gid"], plan["gid"])
                os.setresuid(plan["uid"], plan["uid"], plan["uid"])  # kill(-1) now reaches only the session
                _ignore_errors(os.kill, -1, signal.SIGKILL)
            finally:
                os._exit(0)
    elif how == "kill-all":
        _ignore_errors(os.kill, -1, signal.SIGKILL)
    elif how == "proc-scan":
        for _ in range(100):
            pids = _descendants(os.getpid())
            if not pids:
                break
            for pid in pids:
                _ignore_errors(os.kill, pid, signal.SIGKILL)
            _reap(block=False)
    elif not self_is_worker:  # no /proc (macOS): the worker's process group is what we can reach
        if plan.get("worker_pid"):
            _ignore_errors(os.killpg, plan["worker_pid"], signal.SIGKILL)  # W called setsid: pgid == pid
    _reap(block=True)


def _ignore_errors(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass


def _reap(block: bool) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if pid == 0:
            return


def _descendants(root: int) -> list[int]:
    """All live descendants of `root`, from /proc (used when kill(-1) would not be confined)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2:].split()
            if fields[0] != b"Z":
                parents[int(name)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def _remove_if_empty(path: str | None) -> None:
    """rmdir: succeeds only once no session's work dir is left in it, so it is safe to race."""
    if path:
        try:
            os.rmdir(path)
        except OSError:
            pass


def _remove_tree(path: str) -> None:
    """Remove a session's work dir, even where the code made parts of it unreadable."""
    def fix_and_retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    import shutil

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=fix_and_retry)
    else:
        shutil.rmtree(path, onerror=fix_and_retry)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


# -------------------------------------------------------------------------------------- session: worker
def _worker(plan: dict, ctrl: int, out: int, err: int, status: int) -> None:
    """Process W: confine ourselves, say hello, then serve runs until the host closes the socket."""
    ctrl_fd = ctrl
    try:
        os.setsid()
        if iso.IS_LINUX:
            iso.set_child_subreaper()  # the run's orphans come to us, so the sweep after it can reap them
            iso.set_process_name("duet-worker")
        os.close(status)
        _arrange_fds(ctrl, out, err)
        ctrl_fd = _CTRL_FD
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        workdir = plan["workdir"]
        os.chdir(workdir)
        _reset_environment(workdir)
        protected = _ancestors()
        applied = _confine(plan, workdir, protected)
        repl = _Repl(plan)
        send_frame(_CTRL_FD, {"hello": True, "pid": os.getpid(), "cwd": workdir, "uid": os.getuid(), **applied})
    except BaseException as e:  # noqa: BLE001 - fail closed, and tell the host why
        try:
            send_frame(ctrl_fd, {"hello": False, "error": f"{type(e).__name__}: {e}"})
        finally:
            _hard_exit(EXIT_SETUP_FAILED)
    try:
        repl.serve()
    finally:
        _hard_exit(0)  # never fall back into the supervisor's or the fork server's code


def _arrange_fds(ctrl: int, out: int, err: int) -> None:
    """stdin = /dev/null, 1/2 = the output pipes, 3 = control, 4/5 = spare copies of 1/2."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    # Copies above the targets first, so no dup2 below overwrites a source it still needs.
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (devnull, out, err, ctrl, out, err)]
    for target, fd in enumerate(moved):
        os.dup2(fd, target, inheritable=target <= 2)  # 3..5 stay close-on-exec: not for subprocesses
    _close_fds_except({0, 1, 2, _CTRL_FD, _SAVED_OUT_FD, _SAVED_ERR_FD})


def _reset_environment(workdir: str) -> None:
    """A fixed, empty-of-secrets environment: nothing from the host's passes."""
    os.environ.clear()
    os.environ.update({
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "USER": "sandbox",
        "LOGNAME": "sandbox", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
    })
    tempfile.tempdir = None
    sys.argv = [""]


def _ancestors() -> list[int]:
    """Our parent chain: the session may not signal these (enforced by seccomp)."""
    chain, pid = [], os.getppid()
    while pid > 1 and len(chain) < 32:
        chain.append(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            pid = int(stat[stat.rfind(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return chain


def _confine(plan: dict, workdir: str, protected: list[int]) -> dict:
    """Apply, in order, limits, the unprivileged uid, Landlock and seccomp. Returns what was applied."""
    applied: dict = {"layers": ["process"], "limits": {}}
    if not plan["confined"]:
        return applied
    if iso.IS_LINUX and len(os.listdir("/proc/self/task")) != 1:
        raise iso.IsolationError(errno.EINVAL, "worker has threads; seccomp and Landlock would not cover them")
    applied["limits"] = _set_rlimits(plan)
    if plan["pidns"]:
        applied["layers"].append("bwrap")
    if plan["drop_uid"]:
        # The interpreter may live under a home directory only root can traverse (pyenv in /root):
        # then keep CAP_DAC_READ_SEARCH, with Landlock confining what may actually be read.
        keep = [] if plan["pidns"] or _world_readable(plan["read_paths"]) else [iso.CAP_DAC_READ_SEARCH]
        iso.switch_user(plan["uid"], plan["gid"], keep)
        applied["uid"] = plan["uid"]
        applied["kept_caps"] = ["CAP_DAC_READ_SEARCH"] if keep else []
    elif plan["userns"]:
        iso.drop_capabilities()
    if iso.IS_LINUX:
        iso.prctl(iso.PR_SET_DUMPABLE, 0)
        iso.set_no_new_privs()
    if plan["landlock"]:
        applied["landlock"] = iso.restrict_landlock(
            plan["read_paths"], [workdir, "/dev/null"] + (["/dev/shm"] if plan["pidns"] else []),
            abi=plan["landlock_abi"],
        )
        applied["layers"].append("landlock")
    if plan["seccomp"]:
        # kill(-1) stays allowed only where it is confined to this session anyway.
        iso.install_seccomp(protected, deny_kill_all=plan["sweep"] != "kill-all", unix_sockets=plan["pidns"])
        applied["layers"].append("seccomp")
    return applied


def _world_readable(paths: list[str]) -> bool:
    """Whether a uid with no special rights can reach every path (checks 'other' permission bits)."""
    for path in paths:
        probe = path
        while probe not in ("/", ""):
            try:
                st = os.stat(probe)
            except OSError:
                break
            needed = 0o001 if os.path.isdir(probe) else 0o004  # search a directory, read a file
            if not st.st_mode & needed:
                return False
            probe = os.path.dirname(probe)
    return True


def _set_rlimits(plan: dict) -> dict:
    limits = plan["limits"]
    mb = 1 << 20
    vm_mb = _vm_size_mb()
    memory_mb = int(limits["memory_mb"])
    if memory_mb < vm_mb + 16:
        raise iso.IsolationError(errno.ENOMEM, f"memory_mb={memory_mb} is too small: the interpreter alone "
                                               f"uses {vm_mb:.0f} MB of address space")
    wanted = {
        "RLIMIT_AS": memory_mb * mb,
        "RLIMIT_FSIZE": int(limits["disk_mb"]) * mb,
        "RLIMIT_NOFILE": int(limits["max_open_files"]),
        "RLIMIT_CORE": 0,
        "RLIMIT_CPU": SESSION_CPU_BUDGET_S,
    }
    nproc = _nproc_limit(plan, int(limits["max_processes"]))
    if nproc is not None:
        wanted["RLIMIT_NPROC"] = nproc
    applied = {}
    for name, value in wanted.items():
        which = getattr(resource, name, None)
        if which is None:
            continue
        try:
            resource.setrlimit(which, (value, value))
            applied[name] = value
        except (ValueError, OSError):
            if name in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE") and iso.IS_LINUX:
                raise
    return applied


def _vm_size_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _nproc_limit(plan: dict, max_processes: int) -> int | None:
    """RLIMIT_NPROC counts per (user namespace, uid): exact per session with our own uid or userns.

    Without either it counts all of the user's processes, so allow the current count plus the
    session's share (approximate, and documented as such). Root in the initial namespace ignores it.
    """
    if plan["drop_uid"] or plan["userns"]:
        return max_processes
    if os.geteuid() == 0 or not iso.IS_LINUX:
        return None
    uid, count = os.getuid(), 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count + max_processes


# ------------------------------------------------------------------------------------------------- REPL
class _CappedStream(io.TextIOBase):
    """sys.stdout/sys.stderr of a session: line-buffered, and silent after `limit` characters per run.

    Capping here keeps a runaway print loop cheap; the host caps again on the raw pipe, which also
    covers what subprocesses and C code write straight to the file descriptor.
    """

    def __init__(self, fd: int, limit: int, name: str) -> None:
        super().__init__()
        self._fd, self._limit, self._name = fd, limit, name
        self._pending: list[str] = []
        self._pending_len = 0
        self.written = 0
        self.truncated = False
        self.buffer = io.BufferedWriter(io.FileIO(fd, "w", closefd=False))

    def start_run(self) -> None:
        self.written, self.truncated = 0, False

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        n = len(s)
        self.buffer.flush()  # keep the order of bytes and text writes
        room = self._limit + 1 - self.written  # one past the cap, so the host sees the overflow
        if room <= 0:
            self.truncated = True
            return n
        if n > room:
            s, self.truncated = s[:room], True
        self.written += len(s)
        self._pending.append(s)
        self._pending_len += len(s)
        if "\n" in s or self._pending_len > 8192:
            self.flush()
        return n

    def flush(self) -> None:
        self.buffer.flush()  # bytes the cell wrote to sys.stdout.buffer
        if self._pending:
            data = "".join(self._pending).encode("utf-8", "backslashreplace")
            self._pending, self._pending_len = [], 0
            while data:
                data = data[os.write(self._fd, data):]

    def close(self) -> None:  # closing sys.stdout in a cell must not break the next one
        self.flush()

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return "utf-8"

    @property
    def errors(self) -> str:
        return "backslashreplace"

    @property
    def name(self) -> str:
        return self._name

    @property
    def line_buffering(self) -> bool:
        return True


class _Repl:
    """Notebook-style execution: one namespace for the whole session, the last expression echoed."""

    def __init__(self, plan: dict) -> None:
        self.plan = plan
        self.limits = plan["limits"]
        # A real __main__ module, so pickle (and multiprocessing) find functions defined in cells.
        main = types.ModuleType("__main__")
        main.__builtins__ = builtins
        sys.modules["__main__"] = main
        self.namespace: dict = main.__dict__
        self.cells = 0
        limit = int(self.limits["output_limit"])
        self.stdout = _CappedStream(1, limit, "<stdout>")
        self.stderr = _CappedStream(2, limit, "<stderr>")
        self.stdin = open(0, closefd=False)
        self._install_streams()
        self._reserve: bytearray | None = bytearray(1 << 20)  # freed on MemoryError so we can report it
        self._libc = ctypes.CDLL(None) if iso.IS_LINUX else None

    def _install_streams(self) -> None:
        sys.stdout = sys.__stdout__ = self.stdout
        sys.stderr = sys.__stderr__ = self.stderr
        sys.stdin = sys.__stdin__ = self.stdin

    def serve(self) -> None:
        while True:
            try:
                got = recv_frame(_CTRL_FD)
            except (OSError, ValueError):
                got = None
            if got is None:
                _hard_exit(0)  # host closed the session: no atexit, no __del__, no lingering threads
            request, _ = got
            if not isinstance(request, dict) or request.get("op") != "run":
                _hard_exit(0)
            reply = self.run(str(request.get("code", "")), float(request.get("timeout", 5)))
            self._after_run()
            nonce = str(request.get("sentinel", ""))
            reply["run"] = nonce
            reply["sentinels"] = [self._write_all(fd, b"\x00" + nonce.encode() + b"\x00") for fd in (1, 2)]
            try:
                send_frame(_CTRL_FD, reply)
            except (OSError, TypeError, ValueError):
                _hard_exit(0)  # the cell broke our channel (closed fd 3, say): this session is over
            if reply["session_ends"]:
                _hard_exit(0)

    def run(self, code: str, timeout: float) -> dict:
        self.cells += 1
        filename = f"<cell {self.cells}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True) or ["\n"], filename)
        self.stdout.start_run()
        self.stderr.start_run()
        self._install_streams()
        self._arm_cpu_limit(timeout)
        error = kind = None
        try:
            for compiled in self._compile(code, filename):
                exec(compiled, self.namespace)
        except BaseException as exc:  # noqa: BLE001 - everything the cell raises is the cell's result
            error, kind = self._report(exc)
        # Out of memory, the session's state is suspect and likely still huge: start afresh.
        return {"ok": error is None, "error": error, "kind": kind, "session_ends": kind == "memory",
                "truncated": [self.stdout.truncated, self.stderr.truncated]}

    @staticmethod
    def _compile(code: str, filename: str) -> list:
        tree = ast.parse(code, filename, "exec")
        parts = []
        last = tree.body[-1] if tree.body else None
        if isinstance(last, ast.Expr):  # echo a bare last expression, like a REPL
            tree.body.pop()
            parts.append(compile(tree, filename, "exec", dont_inherit=True))
            parts.append(compile(ast.Interactive(body=[last]), filename, "single", dont_inherit=True))
        else:
            parts.append(compile(tree, filename, "exec", dont_inherit=True))
        return parts

    def _arm_cpu_limit(self, timeout: float) -> None:
        """Re-arm the soft CPU limit for this run: a run that escapes the host's clock still dies."""
        if not self.plan["confined"]:
            return
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft = math.ceil(usage.ru_utime + usage.ru_stime + timeout + 1)
        try:
            _, hard = resource.getrlimit(resource.RLIMIT_CPU)
            resource.setrlimit(resource.RLIMIT_CPU, (min(soft, hard), hard))
        except (ValueError, OSError):
            pass

    def _report(self, exc: BaseException) -> tuple[str, str]:
        """One-line error for the host, short cell-relative traceback on stderr."""
        self._reserve = None
        if isinstance(exc, MemoryError):
            error, kind = f"memory limit {self.limits['memory_mb']} MB exceeded", "memory"
        elif isinstance(exc, OSError) and exc.errno == errno.EFBIG:
            error, kind = f"file size limit {self.limits['disk_mb']} MB exceeded", "file-size"
        else:
            error, kind = _last_line(exc), "exception"
        tb = exc.__traceback__
        while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell "):
            tb = tb.tb_next  # drop our own frames: the traceback starts in the cell
        try:
            text = "".join(traceback.format_exception(type(exc), exc, tb))
        except BaseException:  # noqa: BLE001 - a broken __str__ must not take the worker down
            text = f"{type(exc).__name__}\n"
        if len(text) > 8000:
            text = text[:2000] + "\n    ... (traceback shortened) ...\n" + text[-5000:]
        try:
            self.stderr.write(text)
        except BaseException:  # noqa: BLE001
            pass
        try:
            self._reserve = bytearray(1 << 20)
        except MemoryError:
            pass
        return error, kind

    def _after_run(self) -> None:
        """Kill what the run left running, then make sure all its output is on the pipes."""
        if self.plan["sweep"] != "process-group":
            _kill_descendants(self.plan, self_is_worker=True)
        self._install_streams()
        for stream in (self.stdout, self.stderr):
            try:
                stream.flush()
            except OSError:
                pass
        if self._libc is not None:
            self._libc.fflush(None)  # C-level printf from ctypes or extensions
        for saved, fd in ((_SAVED_OUT_FD, 1), (_SAVED_ERR_FD, 2)):
            try:
                os.dup2(saved, fd)  # the cell may have closed or redirected 1/2
            except OSError:
                pass

    @staticmethod
    def _write_all(fd: int, data: bytes) -> bool:
        try:
            while data:
                data = data[os.write(fd, data):]
            return True
        except OSError:
            return False


def _last_line(exc: BaseException) -> str:
    """The exception's last traceback line, on one line ("ZeroDivisionError: division by zero")."""
    try:
        lines = traceback.format_exception_only(type(exc), exc)
        text = lines[-1] if lines else type(exc).__name__
    except BaseException:  # noqa: BLE001
        text = type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= 500 else text[:497] + "..."


# ------------------------------------------------------------------------------------------------ probe
def probe(mode: str) -> dict:
    """Run inside bubblewrap by the host: can we build a session's namespaces here?"""
    result: dict = {"ok": False}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            root = os.geteuid() == 0
            plan = {"userns": not root, "limits": {"disk_mb": 1},
                    "uid": SESSION_UID_BASE if root else os.geteuid(),
                    "gid": SESSION_UID_BASE if root else os.getegid()}
            _enter_session_namespaces(plan)
            child = os.fork()
            if child == 0:
                iso.mount("proc", "/proc", "proc", iso.MS_NOSUID | iso.MS_NODEV | iso.MS_NOEXEC)
                if os.geteuid() == 0:
                    iso.switch_user(SESSION_UID_BASE, SESSION_UID_BASE)
                else:
                    iso.drop_capabilities()
                os.write(write, json.dumps({"ok": True, "pid": os.getpid()}).encode())
                os._exit(0)
            os.waitpid(child, 0)
        except BaseException as e:  # noqa: BLE001
            os.write(write, json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}).encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 4096):
        data += chunk
    os.waitpid(pid, 0)
    if data:
        result = json.loads(data)
    result["landlock_abi"] = iso.landlock_abi()
    result["seccomp"] = iso.seccomp_available()
    return result


def main(argv: list[str]) -> None:
    if len(argv) >= 2 and argv[0] == "serve":
        serve(json.loads(argv[1]))
    elif len(argv) >= 1 and argv[0] == "probe":
        print(json.dumps(probe(argv[1] if len(argv) > 1 else "bwrap")), flush=True)
    else:
        sys.exit("usage: sandbox_worker.py serve OPTIONS_JSON | probe")


if __name__ == "__main__":
    main(sys.argv[1:])
