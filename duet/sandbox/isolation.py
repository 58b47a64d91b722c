"""Kernel confinement primitives for the duet sandbox: Landlock, seccomp, namespaces, capabilities.

Standard library + ctypes only, because this file also runs *inside* the sandbox (bubblewrap binds
it read-only next to worker.py) where the duet package is not importable. Every function
here either only asks the kernel a question (the ``*_abi`` / ``*_available`` probes, safe for the
host to call) or says in its name that it restricts the calling process (``restrict_*``,
``install_*``, ``drop_*``); those are only ever called in a sandbox process.

Syscall numbers are given for x86_64 and aarch64; on other architectures the seccomp layer
reports itself unavailable rather than guessing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys
from collections.abc import Iterable

IS_LINUX = sys.platform.startswith("linux")
_MACHINE = platform.machine().lower()
ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(_MACHINE)

_libc = ctypes.CDLL(None, use_errno=True) if IS_LINUX else None
if _libc is not None:
    _libc.syscall.restype = ctypes.c_long


class IsolationError(OSError):
    """A confinement step failed; the sandbox fails closed instead of running code less confined."""


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise IsolationError(err, f"{what}: {os.strerror(err)}")
    return ret


# --------------------------------------------------------------------------------------------- syscalls
# Syscalls added since Linux 5.x share one number on every architecture.
_NR_PIDFD_OPEN = 434
_NR_CLONE3 = 435
_NR_LANDLOCK_CREATE_RULESET = 444
_NR_LANDLOCK_ADD_RULE = 445
_NR_LANDLOCK_RESTRICT_SELF = 446

# Per-architecture numbers, from <asm/unistd_64.h> (x86_64) and <asm-generic/unistd.h> (aarch64).
_NR = {
    "x86_64": dict(
        ioctl=16, socket=41, socketpair=53, clone=56, kill=62, ptrace=101, syslog=103,
        rt_sigqueueinfo=129, uselib=134, personality=135, vhangup=153, pivot_root=155, adjtimex=159,
        chroot=161, acct=163, settimeofday=164, mount=165, umount2=166, swapon=167, swapoff=168,
        reboot=169, iopl=172, ioperm=173, init_module=175, delete_module=176, quotactl=179,
        nfsservctl=180, tkill=200, lookup_dcookie=212, clock_settime=227, tgkill=234, kexec_load=246,
        add_key=248, request_key=249, keyctl=250, unshare=272, rt_tgsigqueueinfo=297,
        perf_event_open=298, prlimit64=302, name_to_handle_at=303, open_by_handle_at=304,
        clock_adjtime=305, setns=308, process_vm_readv=310, process_vm_writev=311, kcmp=312,
        finit_module=313, seccomp=317, kexec_file_load=320, bpf=321, userfaultfd=323,
    ),
    "aarch64": dict(
        ioctl=29, socket=198, socketpair=199, clone=220, kill=129, ptrace=117, syslog=116,
        rt_sigqueueinfo=138, personality=92, vhangup=58, pivot_root=41, adjtimex=171, chroot=51,
        acct=89, settimeofday=170, mount=40, umount2=39, swapon=224, swapoff=225, reboot=142,
        init_module=105, delete_module=106, quotactl=60, nfsservctl=42, tkill=130, lookup_dcookie=18,
        clock_settime=112, tgkill=131, kexec_load=104, add_key=217, request_key=218, keyctl=219,
        unshare=97, rt_tgsigqueueinfo=240, perf_event_open=241, prlimit64=261, name_to_handle_at=264,
        open_by_handle_at=265, clock_adjtime=266, setns=268, process_vm_readv=270,
        process_vm_writev=271, kcmp=272, finit_module=273, seccomp=277, kexec_file_load=294, bpf=280,
        userfaultfd=282,
    ),
}
_GENERIC_NR = dict(
    io_uring_setup=425, io_uring_enter=426, io_uring_register=427, open_tree=428, move_mount=429,
    fsopen=430, fsconfig=431, fsmount=432, fspick=433, pidfd_open=_NR_PIDFD_OPEN, clone3=_NR_CLONE3,
    pidfd_getfd=438, process_madvise=440, mount_setattr=442, quotactl_fd=443,
)


def _syscall(nr: int, *args) -> int:
    assert _libc is not None
    return _libc.syscall(ctypes.c_long(nr), *args)


# ------------------------------------------------------------------------------------------------ prctl
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_NAME = 15
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2); raises IsolationError on failure."""
    assert _libc is not None
    args = (ctypes.c_ulong(a) for a in (arg2, arg3, arg4, arg5))
    return _check(_libc.prctl(ctypes.c_int(option), *args), f"prctl({option})")


def set_parent_death_signal(sig: int) -> None:
    prctl(PR_SET_PDEATHSIG, sig)


def set_child_subreaper() -> None:
    """Orphaned descendants are re-parented to us, so we can reap (and account for) all of them."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_process_name(name: str) -> None:
    assert _libc is not None
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def pidfd_open(pid: int) -> int:
    if hasattr(os, "pidfd_open"):
        return os.pidfd_open(pid)
    return _check(_syscall(_NR_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0)), "pidfd_open")


def pidfd_available() -> bool:
    """pidfds let the host signal a session process that lives in another PID namespace."""
    if not IS_LINUX:
        return False
    try:
        os.close(pidfd_open(os.getpid()))
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------- namespaces
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEW_ANY = (
    CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
)

MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000


def unshare(flags: int) -> None:
    assert _libc is not None
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    assert _libc is not None
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {fstype or source} on {target}",
    )


def map_own_ids_in_new_userns(uid: int, gid: int) -> None:
    """After unshare(CLONE_NEWUSER): map our outside uid/gid to the same ids inside (no privilege needed)."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


# ----------------------------------------------------------------------------------------- capabilities
CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def _capset(caps: int) -> None:
    assert _libc is not None
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        word = (caps >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = data[i].inheritable = word
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def _drop_bounding_set(keep: set[int]) -> None:
    """Drop every capability not in `keep` from the bounding set (needs CAP_SETPCAP: do it first)."""
    for cap in range(_last_cap() + 1):
        if cap not in keep:
            try:
                prctl(PR_CAPBSET_DROP, cap)
            except IsolationError as e:
                if e.errno != errno.EINVAL:  # EINVAL: capability unknown to this kernel
                    raise


def _set_capabilities(keep: set[int]) -> None:
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    _capset(sum(1 << c for c in keep))
    for cap in keep:  # ambient, so an exec'd helper (python -c, a shell) keeps the same access
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)


def drop_capabilities(keep: Iterable[int] = ()) -> None:
    """Empty the bounding, ambient, effective, permitted and inheritable sets (except `keep`).

    Needed because a process in a fresh user namespace holds every capability *inside* it.
    """
    keep = set(keep)
    _drop_bounding_set(keep)
    _set_capabilities(keep)


def clear_capabilities() -> None:
    """Without CAP_SETPCAP (an unprivileged user): empty the ambient, effective, permitted and
    inheritable sets; the bounding set cannot be changed, and no_new_privs keeps file capabilities
    from refilling the others."""
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except IsolationError:
        pass  # kernel without ambient capabilities
    _capset(0)
    try:
        drop_capabilities()
    except IsolationError as e:
        if e.errno != errno.EPERM:
            raise


def switch_user(uid: int, gid: int, keep_caps: Iterable[int] = ()) -> None:
    """As real root: become `uid`/`gid` with no supplementary groups, keeping only `keep_caps`."""
    keep = set(keep_caps)
    _drop_bounding_set(keep)
    if keep:
        prctl(PR_SET_KEEPCAPS, 1)  # otherwise setresuid() away from 0 clears the permitted set
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _set_capabilities(keep)
    if keep:
        prctl(PR_SET_KEEPCAPS, 0)


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


# ---------------------------------------------------------------------------------------------- Landlock
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
_FILE_ONLY_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
READ_RIGHTS = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 when Landlock is absent or disabled. Side-effect free."""
    if not IS_LINUX:
        return 0
    flag = ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION)
    abi = _syscall(_NR_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), flag)
    return max(int(abi), 0)


def _fs_rights(abi: int) -> int:
    return _FS_BY_ABI.get(abi, _FS_BY_ABI[5])


def restrict_landlock(
    read_paths: Iterable[str],
    write_paths: Iterable[str],
    *,
    abi: int,
    filesystem: bool = True,
    deny_tcp: bool = True,
    scope: bool = True,
) -> list[str]:
    """Confine the calling thread (and all future children) with a new Landlock domain.

    `read_paths` get read/execute, `write_paths` get every filesystem right; everything else is
    denied. With ABI >= 4 TCP bind/connect are denied outright; with ABI >= 6 signals and
    abstract unix sockets cannot reach outside this domain. Returns what was restricted.
    """
    applied: list[str] = []
    handled_fs = _fs_rights(abi) if filesystem else 0
    handled_net = NET_BIND_TCP | NET_CONNECT_TCP if deny_tcp and abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if scope and abi >= 6 else 0
    attr = struct.pack("=QQQ", handled_fs, handled_net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8  # older kernels reject fields they don't know
    buf = ctypes.create_string_buffer(attr[:size], size)
    ruleset = _check(_syscall(_NR_LANDLOCK_CREATE_RULESET, buf, ctypes.c_size_t(size), ctypes.c_uint32(0)),
                     "landlock_create_ruleset")
    try:
        if handled_fs:
            write_rights = handled_fs & ~(FS_MAKE_CHAR | FS_MAKE_BLOCK)
            for paths, rights in ((read_paths, READ_RIGHTS), (write_paths, write_rights)):
                for path in paths:
                    _add_path_rule(ruleset, path, rights & handled_fs)
            applied.append(f"filesystem (ABI {abi})")
        if handled_net:
            applied.append("tcp")
        if scoped:
            applied.append("scope")
        set_no_new_privs()
        _check(_syscall(_NR_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)),
               "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return applied


def _add_path_rule(ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # a path that does not exist here needs no rule
    try:
        if not os.path.isdir(path):
            rights &= _FILE_ONLY_RIGHTS  # directory rights on a file are EINVAL
        rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd), 12)
        _check(_syscall(_NR_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
                        rule, ctypes.c_uint32(0)), f"landlock_add_rule {path}")
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- seccomp
_SECCOMP_MODE_FILTER = 2
_SECCOMP_GET_ACTION_AVAIL = 2
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_X32_SYSCALL_BIT = 0x40000000
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_OFF_NR, _OFF_ARCH = 0, 4
_AF_UNIX = 1
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C

# Denied outright (EPERM): escape and kernel-attack surface that model-written code never needs.
SECCOMP_DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "process_madvise",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "open_by_handle_at", "name_to_handle_at",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "swapon", "swapoff", "reboot", "syslog", "acct", "quotactl", "quotactl_fd", "lookup_dcookie",
    "vhangup", "settimeofday", "clock_settime", "adjtimex", "clock_adjtime", "iopl", "ioperm",
    "uselib", "nfsservctl",
)
# Syscalls whose first argument names a process: refused when it names a protected one.
_PID_TARGETING = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open", "prlimit64")
# personality(2) values Docker's default profile also allows; anything else (e.g. ADDR_NO_RANDOMIZE) is refused.
_PERSONALITY_OK = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)


def seccomp_available() -> bool:
    """True when this kernel accepts seccomp filters and we know this architecture's syscall table."""
    if not IS_LINUX or ARCH not in _NR:
        return False
    action = ctypes.c_uint32(_RET_ERRNO)
    return _syscall(_NR[ARCH]["seccomp"], ctypes.c_uint(_SECCOMP_GET_ACTION_AVAIL), ctypes.c_uint(0),
                    ctypes.byref(action)) == 0


def _arg_lo(i: int) -> int:
    return 16 + 8 * i  # low 32 bits of seccomp_data.args[i] (little-endian): int-typed args live there


def build_seccomp_filter(
    protected_pids: Iterable[int] = (), *, deny_kill_all: bool = True, unix_sockets: bool = True
) -> bytes:
    """The seccomp BPF program (an array of struct sock_filter) for a session.

    EPERM for SECCOMP_DENIED, for sockets other than AF_UNIX (any socket() at all unless
    `unix_sockets`: Landlock cannot stop connect() to an existing named socket such as
    /run/docker.sock, so without a private filesystem view only socketpair() stays allowed),
    for clone() with namespace flags,
    for TIOCSTI/TIOCLINUX and odd personalities, and for signals, pidfds and prlimit aimed at
    `protected_pids` (and at -1 when `deny_kill_all`). Comparisons look only at the low 32 bits
    where the kernel reads an int, so garbage in the high bits cannot slip past a 64-bit match.
    """
    assert ARCH in _NR
    nr = {**_NR[ARCH], **_GENERIC_NR}
    eperm, enosys = _RET_ERRNO | errno.EPERM, _RET_ERRNO | errno.ENOSYS
    prog: list[tuple[int, int, int, int]] = []

    def ins(code: int, jt: int, jf: int, k: int) -> None:
        prog.append((code, jt, jf, k & 0xFFFFFFFF))

    ins(_LD_W_ABS, 0, 0, _OFF_ARCH)
    ins(_JEQ_K, 1, 0, _AUDIT_ARCH[ARCH])
    ins(_RET_K, 0, 0, _RET_KILL_PROCESS)  # a foreign syscall ABI would make every number below wrong
    ins(_LD_W_ABS, 0, 0, _OFF_NR)
    if ARCH == "x86_64":
        ins(_JGE_K, 0, 1, _X32_SYSCALL_BIT)
        ins(_RET_K, 0, 0, eperm)
    for name in SECCOMP_DENIED:
        if name in nr:
            ins(_JEQ_K, 0, 1, nr[name])
            ins(_RET_K, 0, 0, eperm)
    # clone3 passes its flags in memory that seccomp cannot read: ENOSYS makes libc fall back to clone.
    ins(_JEQ_K, 0, 1, nr["clone3"])
    ins(_RET_K, 0, 0, enosys)

    def on_values(syscall: str, arg: int, values: tuple[int, ...], matched: int, other: int) -> None:
        """For `syscall`: return `matched` when argument `arg` is one of `values`, else `other`."""
        n = len(values)
        ins(_JEQ_K, 0, n + 3, nr[syscall])
        ins(_LD_W_ABS, 0, 0, _arg_lo(arg))
        for p, v in enumerate(values, start=2):
            ins(_JEQ_K, n + 2 - p, 0, v)
        ins(_RET_K, 0, 0, other)
        ins(_RET_K, 0, 0, matched)

    def allow_only(syscall: str, arg: int, values: tuple[int, ...]) -> None:
        on_values(syscall, arg, values, _RET_ALLOW, eperm)

    def deny_values(syscall: str, arg: int, values: tuple[int, ...]) -> None:
        on_values(syscall, arg, values, eperm, _RET_ALLOW)

    if unix_sockets:
        allow_only("socket", 0, (_AF_UNIX,))  # no AF_INET/INET6/PACKET/NETLINK...: no network at all
    else:
        ins(_JEQ_K, 0, 1, nr["socket"])
        ins(_RET_K, 0, 0, eperm)
    allow_only("socketpair", 0, (_AF_UNIX,))
    allow_only("personality", 0, _PERSONALITY_OK)
    deny_values("ioctl", 1, (_TIOCSTI, _TIOCLINUX))  # no typing into a terminal we might share
    ins(_JEQ_K, 0, 4, nr["clone"])  # clone(flags, ...): no new namespaces
    ins(_LD_W_ABS, 0, 0, _arg_lo(0))
    ins(_JSET_K, 1, 0, CLONE_NEW_ANY)
    ins(_RET_K, 0, 0, _RET_ALLOW)
    ins(_RET_K, 0, 0, eperm)
    targets: list[int] = [-1] if deny_kill_all else []  # kill(-1) signals every process we may signal
    for pid in protected_pids:
        if pid > 1:
            targets += [pid, -pid]
    for name in _PID_TARGETING if targets else ():
        if name in nr:
            deny_values(name, 0, tuple(targets))
    ins(_RET_K, 0, 0, _RET_ALLOW)
    if len(prog) > 4096:
        raise IsolationError(errno.E2BIG, "seccomp filter too long")
    return b"".join(struct.pack("=HBBI", *i) for i in prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp(
    protected_pids: Iterable[int] = (), *, deny_kill_all: bool = True, unix_sockets: bool = True
) -> None:
    """Install build_seccomp_filter() on the calling thread and its future children (irreversible)."""
    program = build_seccomp_filter(protected_pids, deny_kill_all=deny_kill_all, unix_sockets=unix_sockets)
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p).value)
    set_no_new_privs()
    prctl(PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
