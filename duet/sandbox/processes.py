"""Process plumbing of a sandbox session: tied forks, waiting, killing and reaping, cleanup.

Runs on the sandboxed side (the session supervisor and the worker); standard library only.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import sys
import time

if __package__:
    from . import isolation as iso
else:  # imported by worker.py run as a script, which put this directory on sys.path
    import isolation as iso


def write_status(fd: int, obj: dict) -> None:
    try:
        os.write(fd, json.dumps(obj).encode() + b"\n")
    except OSError:
        pass  # the host is gone; nobody to tell



def termination_pipe() -> int:
    """Make SIGTERM (the host ending the session) readable on a pipe, instead of an exception that
    could land anywhere: returns the read end, for watch_child to poll."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the wakeup byte is what matters
    return read




def close_fds_except(keep: set[int]) -> None:
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



_lifelines: list[int] = []


def fork_tied() -> int:
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


def watch_child(pid: int, status: int, terminate: int | None = None) -> tuple[int | None, object, str]:
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
        return kill_and_reap(pid, reason)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def kill_and_reap(pid: int, reason: str) -> tuple[int | None, object, str]:
    """SIGKILL ``pid`` and wait for it: (wait status, rusage, reason); None, None when it was reaped already."""
    ignore_errors(os.kill, pid, signal.SIGKILL)
    try:
        _, wait_status, usage = os.wait4(pid, 0)
    except ChildProcessError:
        return None, None, reason
    return wait_status, usage, reason


def exit_report(wait_status: int | None, usage: object, reason: str) -> dict:
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


def kill_descendants(plan: dict, *, self_is_worker: bool = False) -> None:
    """SIGKILL every process this session started (except the caller), then reap them all.

    The caller is a subreaper (C or W), so every orphan of the session ends up as its child. The
    worker's own threads may keep forking while it sweeps: then it gives up after a short while,
    and the relay stops whatever is left when the run ends.
    """
    deadline = time.monotonic() + 0.2
    while True:
        _kill_session(plan, self_is_worker)
        if not self_is_worker:
            reap(block=True)
            return
        if not reap(block=False) or time.monotonic() > deadline:
            return
        time.sleep(0.001)


def _kill_session(plan: dict, self_is_worker: bool) -> None:
    how = plan["sweep"]
    if how == "kill-all" and plan["drop_uid"] and not self_is_worker:
        helper = os.fork()  # C stays root (to remove the work dir); a helper takes the session's uid
        if helper == 0:
            try:
                os.setgroups([])
                os.setresgid(plan["gid"], plan["gid"], plan["gid"])
                os.setresuid(plan["uid"], plan["uid"], plan["uid"])  # kill(-1) now reaches only the session
                ignore_errors(os.kill, -1, signal.SIGKILL)
            finally:
                os._exit(0)
    elif how == "kill-all":
        ignore_errors(os.kill, -1, signal.SIGKILL)
    elif how == "proc-scan":
        for _ in range(100):
            pids = [pid for pid, _state in descendants_with_state(os.getpid())]
            if not pids:
                break
            for pid in pids:
                ignore_errors(os.kill, pid, signal.SIGKILL)
            reap(block=False)
    elif not self_is_worker:  # no /proc (macOS): the worker's process group is what we can reach
        if plan.get("worker_pid"):
            ignore_errors(os.killpg, plan["worker_pid"], signal.SIGKILL)  # W called setsid: pgid == pid


def ignore_errors(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass


def reap(block: bool) -> bool:
    """Reap exited children; True when some child is still running (only without `block`)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return False
        except InterruptedError:
            continue
        if pid == 0:
            return True


def descendants(root: int) -> list[int]:
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


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return chr(stat[stat.rfind(b")") + 2])


def descendants_with_state(root: int) -> list[tuple[int, str]]:
    """Live descendants of `root` and their /proc state letter, found by walking the children files
    of every thread (cost grows with the session, not the machine); a /proc scan where those are missing."""
    if not os.path.exists(f"/proc/{root}/task/{root}/children"):
        return [(pid, _state(pid) or "X") for pid in descendants(root)]
    found: list[tuple[int, str]] = []
    seen, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", "rb") as f:
                    children = [int(c) for c in f.read().split()]
            except (OSError, ValueError):
                continue
            for child in children:
                if child not in seen:
                    seen.add(child)
                    state = _state(child)
                    if state is not None:
                        found.append((child, state))
                        frontier.append(child)
    return found


def remove_if_empty(path: str | None) -> None:
    """rmdir: succeeds only once no session's work dir is left in it, so it is safe to race."""
    if path:
        try:
            os.rmdir(path)
        except OSError:
            pass


def remove_tree(path: str) -> None:
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

