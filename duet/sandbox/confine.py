"""Process W's set-up: its file descriptors and environment, rlimits, uid, Landlock and seccomp.

Runs on the sandboxed side; standard library only.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal
import sys
import tempfile

if __package__:
    from . import framing, limits, processes, repl
    from . import isolation as iso
else:  # imported by worker.py run as a script, which put this directory on sys.path
    import framing
    import isolation as iso
    import limits
    import processes
    import repl

# The worker's own reference: a cell that monkey-patches os._exit cannot keep the worker alive.
_hard_exit = os._exit


def run_worker(plan: dict, ctrl: int, out: int, err: int, status: int) -> None:
    """Process W: confine ourselves, say hello, then serve runs until the host closes the socket."""
    ctrl_fd = ctrl
    try:
        os.setsid()
        if iso.IS_LINUX:
            iso.set_child_subreaper()  # the run's orphans come to us, so the sweep after it can reap them
            iso.set_process_name("duet-worker")
        os.close(status)
        _arrange_fds(ctrl, out, err)
        ctrl_fd = limits.CTRL_FD
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        workdir = plan["workdir"]
        os.chdir(workdir)
        _reset_environment(workdir)
        protected = _ancestors()
        applied = _confine(plan, workdir, protected)
        session_repl = repl.Repl(plan)
        hello = {"hello": True, "pid": os.getpid(), "cwd": workdir, "uid": os.getuid(), **applied}
        framing.send_frame(limits.CTRL_FD, hello)
    except BaseException as e:  # noqa: BLE001 - fail closed, and tell the host why
        try:
            framing.send_frame(ctrl_fd, {"hello": False, "error": f"{type(e).__name__}: {e}"})
        finally:
            _hard_exit(limits.EXIT_SETUP_FAILED)
    try:
        session_repl.serve()
    finally:
        _hard_exit(0)  # never fall back into the supervisor's or the fork server's code


def _arrange_fds(ctrl: int, out: int, err: int) -> None:
    """stdin = /dev/null, 1/2 = the output pipes, 3 = control, 4/5 = spare copies of 1/2."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    # Copies above the targets first, so no dup2 below overwrites a source it still needs.
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (devnull, out, err, ctrl, out, err)]
    for target, fd in enumerate(moved):
        os.dup2(fd, target, inheritable=target <= 2)  # 3..5 stay close-on-exec: not for subprocesses
    processes.close_fds_except({0, 1, 2, limits.CTRL_FD, limits.SAVED_OUT_FD, limits.SAVED_ERR_FD})


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
        # No capability survives: without bwrap, C already replaced directories on the way to the
        # interpreter that the session's uid cannot traverse (pyenv in /root) by a private view.
        iso.switch_user(plan["uid"], plan["gid"])
        applied["uid"] = plan["uid"]
        if not plan["pidns"] and not _world_readable(plan["read_paths"]):
            raise iso.IsolationError(errno.EACCES, "the interpreter is not readable by an unprivileged uid here "
                                                   "(as root, install Python where other users can read it)")
    elif plan["userns"]:
        iso.drop_capabilities()
    elif iso.IS_LINUX:
        iso.clear_capabilities()  # a user without privilege may still hold ambient or inherited ones
    applied["kept_caps"] = []
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
    wanted_limits = plan["limits"]
    mb = 1 << 20
    vm_mb = vm_size_mb()
    memory_mb = int(wanted_limits["memory_mb"])
    if memory_mb < vm_mb + 16:
        raise iso.IsolationError(errno.ENOMEM, f"memory_mb={memory_mb} is too small: the interpreter alone "
                                               f"uses {vm_mb:.0f} MB of address space")
    wanted = {
        "RLIMIT_AS": memory_mb * mb,
        "RLIMIT_FSIZE": int(wanted_limits["disk_mb"]) * mb,
        "RLIMIT_NOFILE": int(wanted_limits["max_open_files"]),
        "RLIMIT_CORE": 0,
        "RLIMIT_CPU": limits.SESSION_CPU_BUDGET_S,
    }
    nproc = _nproc_limit(plan, int(wanted_limits["max_processes"]))
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


def vm_size_mb() -> float:
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

