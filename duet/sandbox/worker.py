"""The sandboxed side of duet's sandbox: fork server, session supervisor and the REPL worker.

The host (duet/sandbox/servers.py) starts one fork server per isolation mode and process:

    python -I -B worker.py serve '<options json>'        (inside bubblewrap when available)

The fork server imports the heavy modules once (sympy, ...) and then, for every session the host
asks for, forks this chain (the host holds a pidfd of C and talks to W over its own socket):

    fork server ─ C  session supervisor: own session, optional namespaces, work dir, cleanup
                  └ I  (bwrap mode only) PID 1 of the session's private PID namespace
                      └ W  the worker: limits, privileges dropped, Landlock, seccomp, then a REPL

W runs model-written code; C and I never do. The host's control socket goes to the relay S (I in
bwrap mode, else C; see relay.py), never to W: S forwards each run to W over a private socket,
checks W's result, stops every process of the session, and only then reports to the host, so the
output pipes hold the run's complete output and nothing of the session runs between runs. Whoever
reaps W (C, or I in bwrap mode) writes one JSON line describing how W ended on the status pipe;
the host treats EOF on that pipe as "the session is gone". Where the host could make one,
C first joins the session's own memory cgroup, so every process and memfd of it counts.

Standard library only: inside bubblewrap the duet package is not importable, only the modules in
WORKER_MODULES are bound into /opt/duet-sandbox.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import signal
import socket
import sys
import tempfile

WORKER_MODULES = ("worker", "confine", "framing", "isolation", "limits", "processes", "relay", "repl")

if __package__:
    from . import confine, framing, limits, processes, relay
    from . import isolation as iso
else:  # run as a script: import the sibling files, then stop exposing this directory to user code
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import confine
    import framing
    import isolation as iso
    import limits
    import processes
    import relay

    sys.path.pop(0)

PRELOAD = ("math", "fractions", "itertools", "functools", "collections", "decimal", "statistics", "sympy")


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
    framing.send_frame(channel_fd, {"ready": True, **env})
    uid_counter = int.from_bytes(os.urandom(4), "little")
    while True:
        try:
            got = framing.recv_frame(channel_fd, channel)
        except (OSError, ValueError):
            got = None
        if got is None:
            processes.remove_if_empty(options.get("base_dir"))  # else the last session supervisor removes it
            os._exit(0)
        request, fds = got
        # ctrl, out, err, status, and the session's cgroup.procs when the host made it a cgroup
        if not isinstance(request, dict) or request.get("op") != "spawn" or len(fds) != 4 + bool(request.get("cgroup")):
            for fd in fds:
                os.close(fd)
            framing.send_frame(channel_fd, {"error": "bad request"})
            continue
        uid_counter += 1
        session_uid = limits.SESSION_UID_BASE + uid_counter % limits.SESSION_UID_SPAN
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
        framing.send_frame(channel_fd, {"pid": pid}, channel, reply_fds)
        for fd in reply_fds:
            os.close(fd)


def _warm_sympy() -> None:
    import sympy

    x = sympy.Symbol("x")
    sympy.simplify((x**2 - 1) / (x - 1))
    sympy.sympify("sqrt(8) + Rational(1, 3)")


def _describe_environment(options: dict) -> dict:
    """What the fork server can offer its sessions; also sent to the host as the ready message."""
    vm_mb = confine.vm_size_mb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # macOS: bytes
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
    ctrl, out, err, status = fds[:4]
    code = 0
    try:
        if len(fds) > 4:  # join the session's cgroup (memory bound) before anything else is forked
            try:
                os.write(fds[4], b"0")
            finally:
                os.close(fds[4])
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        processes.close_fds_except({0, ctrl, out, err, status})
        terminate = processes.termination_pipe()
        plan = _session_plan(options, env, request, session_uid)
        if iso.IS_LINUX:
            iso.set_process_name("duet-session")
            iso.set_child_subreaper()  # W's orphans come back to us, so cleanup can find them all
        if plan["pidns"]:
            enter_session_namespaces(plan)
            # A folder of the private /tmp, so an interpreter kept under /tmp (a checkout there) is not
            # in the listing of the work dir.
            workdir = "/tmp/work"
            os.makedirs(workdir, mode=0o700, exist_ok=True)
            if plan["drop_uid"]:
                os.chown(workdir, plan["uid"], plan["gid"])
        else:
            if plan["drop_uid"]:
                enter_root_session_namespaces()
            workdir = tempfile.mkdtemp(prefix="s-", dir=plan["base_dir"])
            if plan["drop_uid"]:
                os.chown(workdir, plan["uid"], plan["gid"])
            if plan["sweep"] == "kill-all" and plan["scope"] and not plan["drop_uid"]:
                # A signal-scope-only domain around the session, so our own kill(-1) in cleanup
                # reaches only our descendants (W nests its stricter domain inside this one).
                iso.restrict_landlock([], [], abi=plan["landlock_abi"], filesystem=False, deny_tcp=False)
        plan["workdir"] = workdir
        relay_end, worker_end = _socketpair() if not plan["pidns"] else (-1, -1)
        child = processes.fork_tied()
        if child == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.close(terminate)
            if plan["pidns"]:
                _session_init(plan, ctrl, out, err, status)
            else:
                os.close(relay_end)
                os.close(ctrl)  # W never holds the host's control socket: the relay (we) does
                confine.run_worker(plan, worker_end, out, err, status)
            os._exit(limits.EXIT_SETUP_FAILED)  # not reached
        plan["worker_pid"] = child
        for fd in (out, err) + ((worker_end,) if not plan["pidns"] else (ctrl,)):
            os.close(fd)
        if plan["pidns"]:  # I relays; we only wait for it (and kill it when told to)
            wait_status, usage, reason = processes.watch_child(child, status, terminate)
        else:
            wait_status, usage, reason = relay.Relay(plan, child, ctrl, relay_end, status, terminate).serve()
        if not plan["pidns"]:  # (with a PID namespace, I reports and the kernel does the cleanup)
            signal.alarm(limits.CLEANUP_ALARM_S)
            processes.kill_descendants(plan)
            processes.remove_tree(workdir)
            if os.getppid() != plan["server_pid"]:  # the fork server is gone: the last one out tidies up
                processes.remove_if_empty(plan["base_dir"])
            processes.write_status(status, processes.exit_report(wait_status, usage, reason))
    except BaseException as e:  # noqa: BLE001 - report anything, then exit without Python's shutdown
        processes.write_status(status, {"error": f"session supervisor: {type(e).__name__}: {e}"})
        code = limits.EXIT_SETUP_FAILED
    os._exit(code)



def _socketpair() -> tuple[int, int]:
    """The private channel between the relay and W (W's fd 3): a Unix socket pair, as raw fds."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return a.detach(), b.detach()


def enter_session_namespaces(plan: dict) -> None:
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


def enter_root_session_namespaces() -> None:
    """As root without bubblewrap (the rlimits and landlock levels): a private network namespace
    (no interface but a loopback that is down) and a private mount view in which each directory
    an unprivileged uid could not traverse on the way to the interpreter (/root, for pyenv) is an
    empty tmpfs holding only the interpreter. The session's uid then holds no capability at all."""
    iso.unshare(iso.CLONE_NEWNS | iso.CLONE_NEWNET)
    iso.mount("none", "/", None, iso.MS_REC | iso.MS_PRIVATE)
    roots = python_roots()
    hidden: dict[str, list[str]] = {}
    for root in roots:
        path, top = root, None
        while path not in ("/", ""):
            try:
                if not os.stat(path).st_mode & 0o001:
                    top = path  # keep going: the outermost one is covered
            except OSError:
                break
            path = os.path.dirname(path)
        if top is not None and top != root:
            hidden.setdefault(top, []).append(root)
    for top in sorted(hidden, key=len):
        if any(top.startswith(other.rstrip("/") + "/") for other in hidden if other != top):
            continue  # inside a directory already replaced
        inside = [r for t, rs in hidden.items() if t == top or t.startswith(top.rstrip("/") + "/") for r in rs]
        keep = [(root, os.open(root, os.O_PATH | os.O_CLOEXEC)) for root in inside]
        iso.mount("tmpfs", top, "tmpfs", iso.MS_NOSUID | iso.MS_NODEV, "size=1m,nr_inodes=1024,mode=0755")
        for root, fd in keep:
            os.makedirs(root, mode=0o755, exist_ok=True)
            iso.mount(f"/proc/self/fd/{fd}", root, None, iso.MS_BIND | iso.MS_REC)
            os.close(fd)


def _session_init(plan: dict, ctrl: int, out: int, err: int, status: int) -> None:
    """Process I: PID 1 of the session's namespace. Its exit makes the kernel kill everything in it.

    It dies with C (forked by processes.fork_tied), so killing C is enough to end the whole session.
    """
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)  # PID 1 ignores default-action signals from inside
        iso.mount("proc", "/proc", "proc", iso.MS_NOSUID | iso.MS_NODEV | iso.MS_NOEXEC)
        relay_end, worker_end = _socketpair()
        child = processes.fork_tied()
        if child == 0:
            os.close(relay_end)
            os.close(ctrl)  # W never holds the host's control socket: the relay (I) does
            confine.run_worker(plan, worker_end, out, err, status)
        for fd in (out, err, worker_end):
            os.close(fd)
        wait_status, usage, reason = relay.Relay(plan, child, ctrl, relay_end, status).serve()
        processes.write_status(status, processes.exit_report(wait_status, usage, reason))
    except BaseException as e:  # noqa: BLE001
        processes.write_status(status, {"error": f"session init: {type(e).__name__}: {e}"})
    os._exit(0)



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
                    "uid": limits.SESSION_UID_BASE if root else os.geteuid(),
                    "gid": limits.SESSION_UID_BASE if root else os.getegid()}
            enter_session_namespaces(plan)
            child = os.fork()
            if child == 0:
                iso.mount("proc", "/proc", "proc", iso.MS_NOSUID | iso.MS_NODEV | iso.MS_NOEXEC)
                if os.geteuid() == 0:
                    iso.switch_user(limits.SESSION_UID_BASE, limits.SESSION_UID_BASE)
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
        sys.exit("usage: worker.py serve OPTIONS_JSON | probe")


if __name__ == "__main__":
    main(sys.argv[1:])
