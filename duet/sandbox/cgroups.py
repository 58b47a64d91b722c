"""The host side of the per-session memory bound: one memory cgroup per session, where one can be made.

RLIMIT_AS bounds each process; a session can hold more than that with several processes, or with
memfd/shm pages that count against no address space. A memory cgroup counts all of it: every
process of the session, their page cache, tmpfs and memfd pages. The host makes one per session
below its own cgroup (cgroup v2 ``memory.max``, else cgroup v1 ``memory.limit_in_bytes``), and
hands the session supervisor an open ``cgroup.procs`` to join before it forks anything (so this
works from inside bubblewrap, which shows no /sys/fs/cgroup). Where neither can be made (no
cgroup write access, no memory controller, macOS), the session's memory is bounded only per
process: up to memory_mb x max_processes, plus disk_mb per memfd or file (describe_memory_bound()).
"""

from __future__ import annotations

import itertools
import os
import threading

_counter = itertools.count()
_lock = threading.Lock()
_support: tuple[str, str] | None | bool = False  # False: not probed yet; None: unavailable


def _own_cgroups() -> dict[str, str]:
    """controller (or "" for v2) -> our cgroup path, from /proc/self/cgroup."""
    found = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for name in controllers.split(",") if controllers else [""]:
                    found[name] = path
    except OSError:
        pass
    return found


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of every cgroup mount."""
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, right = line.split(" - ", 1)
                fstype, _source, options = right.split()[:3]
                if fstype in ("cgroup", "cgroup2"):
                    found.append((left.split()[4], fstype, options))
    except (OSError, ValueError):
        pass
    return found


def _candidates() -> list[tuple[str, str]]:
    """(version, parent dir) where a session's memory cgroup could be made, best first."""
    own = _own_cgroups()
    out = []
    for point, fstype, options in _mounts():
        if fstype == "cgroup2" and "" in own:
            parent = os.path.join(point, own[""].lstrip("/"))
            try:
                with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                    if "memory" in f.read().split():
                        out.insert(0, ("v2", parent))
            except OSError:
                pass
        elif fstype == "cgroup" and "memory" in options.split(",") and "memory" in own:
            out.append(("v1", os.path.join(point, own["memory"].lstrip("/"))))
    return out


class SessionCgroup:
    """One session's memory cgroup; `procs_fd` is what the session supervisor writes "0" to."""

    def __init__(self, version: str, parent: str, memory_mb: int) -> None:
        self.version = version
        self.path = os.path.join(parent, f"duet-sandbox-{os.getpid()}-{next(_counter)}")
        os.mkdir(self.path)
        self.procs_fd = -1
        try:
            limit = str(memory_mb << 20)
            if version == "v2":
                self._write("memory.max", limit)
                self._write("memory.swap.max", "0", optional=True)
            else:
                self._write("memory.limit_in_bytes", limit)
                self._write("memory.memsw.limit_in_bytes", limit, optional=True)  # no escape into swap
            self.procs_fd = os.open(os.path.join(self.path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        except BaseException:
            self.remove()
            raise

    def _write(self, name: str, value: str, optional: bool = False) -> None:
        try:
            with open(os.path.join(self.path, name), "w") as f:
                f.write(value)
        except OSError:
            if not optional:
                raise

    def oom_killed(self) -> bool:
        """Whether the kernel hit the bound (v2: an OOM kill; v1: the limit was reached)."""
        try:
            if self.version == "v2":
                with open(os.path.join(self.path, "memory.events")) as f:
                    for line in f:
                        key, _, value = line.partition(" ")
                        if key == "oom_kill" and int(value) > 0:
                            return True
                return False
            with open(os.path.join(self.path, "memory.oom_control")) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and int(value) > 0:
                        return True
            for name in ("memory.failcnt", "memory.memsw.failcnt"):
                try:
                    with open(os.path.join(self.path, name)) as f:
                        if int(f.read()) > 0:
                            return True
                except FileNotFoundError:
                    continue
            return False
        except (OSError, ValueError):
            return False

    def close_fd(self) -> None:
        if self.procs_fd >= 0:
            os.close(self.procs_fd)
            self.procs_fd = -1

    def remove(self) -> None:
        """Remove the cgroup once its processes are gone (rmdir fails while any is left)."""
        self.close_fd()
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def create(memory_mb: int) -> SessionCgroup | None:
    """A memory cgroup for a new session, or None where this machine lets us make none."""
    global _support
    with _lock:
        if _support is False:
            _support = None
            for version, parent in _candidates():
                try:
                    SessionCgroup(version, parent, 64).remove()
                except OSError:
                    continue
                _support = (version, parent)
                break
        support = _support
    if support is None:
        return None
    try:
        return SessionCgroup(support[0], support[1], memory_mb)
    except OSError:
        return None


def describe_memory_bound() -> tuple[bool, str]:
    """(whether each session gets a memory cgroup here, one line saying what bounds memory)."""
    cgroup = create(64)
    if cgroup is not None:
        version = cgroup.version
        cgroup.remove()
        what = "memory.max" if version == "v2" else "memory.limit_in_bytes"
        return True, (f"cgroup {version} {what} per session: every process, memfd and tmpfs page of a "
                      "session counts against memory_mb")
    return False, ("no cgroup can be made here: memory_mb bounds each process's address space only, so a "
                   "session can hold up to memory_mb x max_processes, plus disk_mb per memfd or file")
