"""The host side of a sandbox session: `Sandbox` runs code in it and `RunResult` (duet/sandbox/results.py) says
what happened.

The layers of isolation and the speed are described in the package docstring (duet/sandbox/__init__.py).
"""


from __future__ import annotations

import errno
import json
import os
import secrets
import select
import selectors
import signal
import socket
import threading
import time
from collections.abc import Collection

from duet.sandbox import cgroups, framing, limits, processes
from duet.sandbox.results import OutputCollector, RunResult
from duet.sandbox.servers import SandboxError, _ForkServer, _get_server, _resolve

SKIPPABLE_LAYERS = ("landlock", "seccomp", "uid")


def _one_line(value: object) -> str | None:
    """An error string from the worker, made safe to show: one line, bounded length."""
    return None if value is None else limits.one_line(value)


# -------------------------------------------------------------------------------------------- sessions
class _Session:
    """The host's handles on one live session: its sockets and pipes, and a pidfd of its supervisor."""

    def __init__(self, server: _ForkServer, request: dict, cgroup: cgroups.SessionCgroup | None = None) -> None:
        self.server = server
        self.cgroup = cgroup
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
        fds = [ctrl_child.fileno(), out_w, err_w, status_w]
        if cgroup is not None:
            request = {**request, "cgroup": True}
            fds.append(cgroup.procs_fd)
        try:
            self.pid, self.pidfd = server.spawn(request, fds)
        except BaseException:
            self.close_fds()
            raise
        finally:
            ctrl_child.close()
            if cgroup is not None:
                cgroup.close_fd()
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
            if not self.wait_gone(limits.KILL_GRACE_S):
                self.signal(signal.SIGKILL)
                self.wait_gone(limits.KILL_GRACE_S)

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
            processes.remove_tree(workdir)  # the supervisor normally did this; it may have been SIGKILLed
        if base and not self.server.alive():
            processes.remove_if_empty(base)
        self.remove_cgroup()

    def remove_cgroup(self) -> None:
        if self.cgroup is not None:
            for _ in range(50):  # the last processes may still be exiting
                self.cgroup.remove()
                if not os.path.isdir(self.cgroup.path):
                    break
                time.sleep(0.01)

    def close_fds(self) -> None:
        if self.cgroup is not None and self.gone:
            self.cgroup.remove()
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


def _checked_reply(frame: dict) -> dict:
    """The relay's reply to a run, checked by type: a reply or {"broken": ...}; never raises TypeError later."""
    if set(frame) == {"run", "broken"}:
        return {"broken": True}
    fields = {"run", "ok", "error", "kind", "truncated", "session_ends"}
    truncated = frame.get("truncated")
    if (set(frame) != fields or not isinstance(frame["ok"], bool)
            or not (frame["error"] is None or isinstance(frame["error"], str))
            or not (frame["kind"] is None or isinstance(frame["kind"], str))
            or not (isinstance(truncated, list) and len(truncated) == 2 and all(isinstance(t, bool) for t in truncated))
            or not isinstance(frame["session_ends"], bool)):
        return {"broken": True}
    return frame


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
        timeout: float = limits.DEFAULT_TIMEOUT_S,
        memory_mb: int = limits.DEFAULT_MEMORY_MB,
        isolation: str = "auto",
        *,
        output_limit: int = limits.DEFAULT_OUTPUT_LIMIT,
        disk_mb: int = limits.DEFAULT_DISK_MB,
        max_processes: int = limits.DEFAULT_MAX_PROCESSES,
        max_open_files: int = limits.DEFAULT_MAX_OPEN_FILES,
        skip_layers: Collection[str] = (),
    ) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        if (memory_mb < limits.MIN_MEMORY_MB or disk_mb < limits.MIN_DISK_MB or max_processes < limits.MIN_MAX_PROCESSES
                or max_open_files < limits.MIN_MAX_OPEN_FILES or output_limit < 1):
            raise ValueError(f"memory_mb >= {limits.MIN_MEMORY_MB}, disk_mb >= {limits.MIN_DISK_MB}, "
                             f"max_processes >= {limits.MIN_MAX_PROCESSES}, max_open_files >= "
                             f"{limits.MIN_MAX_OPEN_FILES} and output_limit >= 1 are required")
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
            cgroup = cgroups.create(self.memory_mb) if self.isolation != "none" else None
            try:
                session = _Session(server, request, cgroup)
            except (OSError, ValueError, SandboxError) as e:
                if cgroup is not None:
                    cgroup.remove()
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
        frames = framing.FrameBuffer()
        deadline = time.monotonic() + limits.SESSION_START_TIMEOUT_S
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
                except framing.ProtocolError as e:
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
        The reply comes from the session's relay, which the code cannot reach; it is still checked
        field by field, and anything malformed ends the session as a protocol error.
        """
        nonce = secrets.token_hex(16)
        out = OutputCollector(self.output_limit)
        err = OutputCollector(self.output_limit)
        frames = framing.FrameBuffer()
        reply: dict | None = None
        timed_out = broken = False
        start = time.monotonic()
        deadline = start + self.timeout
        request = framing.encode_frame({"op": "run", "code": code, "timeout": self.timeout, "run": nonce})
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
            while reply is None and not broken:
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
                            session.wait_gone(limits.KILL_GRACE_S)  # the session is ending: collect its report
                            continue
                        try:
                            for frame in frames.feed(chunk):
                                if frame.get("run") == nonce:
                                    reply = _checked_reply(frame)
                        except framing.ProtocolError:
                            broken = True
                    else:
                        self._drain(key.fd, key.data, sel)
        if reply is not None and "broken" in reply:
            reply, broken = None, True
        if reply is not None:
            for fd, collector in ((session.out, out), (session.err, err)):
                self._drain_available(fd, collector)  # the session is stopped: this is all of it
        seconds = time.monotonic() - start
        died = timed_out or reply is None
        if died:
            session.terminate()  # kills and reaps everything the session started
            for fd, collector in ((session.out, out), (session.err, err)):
                self._drain_rest(fd, collector)
        truncated = out.truncated or err.truncated or any((reply or {}).get("truncated", []))
        if died:
            error = "the session broke the sandbox protocol" if broken else self._death_reason(session, timed_out)
            ok = False
        else:
            assert reply is not None
            ok = reply["ok"]
            error = _one_line(reply["error"])
            if error is None and truncated:
                error = f"output truncated at {_format_size(self.output_limit)}"
        result = RunResult(stdout=out.text(), stderr=err.text(), error=error, ok=ok, seconds=seconds,
                           truncated=truncated)
        return result, died or bool((reply or {}).get("session_ends"))

    @staticmethod
    def _drain_available(fd: int, collector: OutputCollector) -> None:
        """Read what is in the pipe now, without waiting (its writers are stopped or gone)."""
        while not collector.eof:
            try:
                chunk = os.read(fd, 1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            if not chunk:
                collector.eof = True
                return
            collector.feed(chunk)

    @staticmethod
    def _drain(fd: int, collector: OutputCollector, sel: selectors.BaseSelector) -> None:
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
    def _drain_rest(fd: int, collector: OutputCollector) -> None:
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
        if sig == getattr(signal, "SIGXCPU", None) or (sig == signal.SIGKILL and cpu >= limits.SESSION_CPU_BUDGET_S):
            return f"timed out after {self.timeout:g} s (CPU time limit)"
        oom = sig == signal.SIGKILL and session.cgroup is not None and session.cgroup.oom_killed()
        if sig is not None and (rss >= 0.75 * self.memory_mb or oom):
            return f"memory limit {self.memory_mb} MB exceeded ({_signal_name(sig)})"
        if sig is not None:
            return f"session crashed: {_signal_name(sig)}"
        return f"session exited with status {report.get('exit')}"
