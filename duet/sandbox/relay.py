"""Process S, the session's relay: the only holder of the host's control socket, and the freezer.

The worker W runs model-written code, so anything W knows or writes is the cell's to forge: its
memory, its frames, its rlimits. S is a process that never runs a cell (C in the plain modes, I
in bwrap mode), that W cannot signal, trace or read (ancestor; non-dumpable; seccomp and, as
root, another uid). S alone talks to the host; W gets a private socket to S instead.

For each run S forwards the code to W with a fresh nonce of its own, waits for W's result,
validates it strictly (types and sizes), then **stops every process of the session**
(SIGSTOP; kill(-1) from PID 1 of the session's namespace, else a walk of S's descendants) before
it reports to the host with the host's own nonce. Between runs nothing of the session runs; the
next run continues them (SIGCONT). So a cell that steals W's nonce and reports early gains
nothing: it is frozen the moment its report arrives, its output is what it wrote until then, and
the host's wall-clock deadline bounds every run whatever the cell does to its own rlimits.

Runs on the sandboxed side; standard library only.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import time

if __package__:
    from . import framing, limits, processes
    from . import isolation as iso
else:  # imported by worker.py run as a script, which put this directory on sys.path
    import framing
    import isolation as iso
    import limits
    import processes

FREEZE_TIMEOUT_S = 0.5  # processes not stopped by then (stuck in the kernel) are killed instead
_STOPPED_STATES = frozenset("TtZX")


class Broken(Exception):
    """W sent something that is not a valid result: the session is over."""


def valid_result(frame: dict) -> dict:
    """W's result frame, checked field by field; raises Broken on anything unexpected."""
    def check(cond: bool, what: str) -> None:
        if not cond:
            raise Broken(what)

    check(set(frame) == {"run", "ok", "error", "kind", "truncated", "session_ends"}, "unexpected fields")
    check(isinstance(frame["ok"], bool), "ok")
    check(frame["error"] is None or (isinstance(frame["error"], str) and len(frame["error"]) <= 4096), "error")
    check(frame["kind"] is None or frame["kind"] in ("memory", "file-size", "exception"), "kind")
    truncated = frame["truncated"]
    check(isinstance(truncated, list) and len(truncated) == 2 and all(isinstance(t, bool) for t in truncated),
          "truncated")
    check(isinstance(frame["session_ends"], bool), "session_ends")
    check(frame["ok"] == (frame["error"] is None), "ok and error disagree")
    return {"ok": frame["ok"], "error": frame["error"], "kind": frame["kind"], "truncated": list(truncated),
            "session_ends": frame["session_ends"]}


def _valid_request(frame: dict) -> bool:
    return (frame.get("op") == "run" and isinstance(frame.get("code"), str)
            and isinstance(frame.get("timeout"), (int, float)) and isinstance(frame.get("run"), str))


class Relay:
    def __init__(self, plan: dict, worker_pid: int, host: int, worker: int, status: int,
                 terminate: int | None = None) -> None:
        self.plan, self.pid = plan, worker_pid
        self.host, self.worker, self.status, self.terminate = host, worker, status, terminate
        self.host_frames = framing.FrameBuffer()
        self.worker_frames = framing.FrameBuffer()
        self.run_nonce: str | None = None  # the host's nonce of the run in progress
        self.worker_nonce: str | None = None  # ours, for W: W (the cell) knows it, the host never sees it
        self.hello_sent = False
        self.frozen = False

    def serve(self) -> tuple[int | None, object, str]:
        """Relay until W exits or the session must end. Returns (wait status, rusage, reason)."""
        pidfd = None
        try:
            pidfd = iso.pidfd_open(self.pid) if iso.IS_LINUX else None
        except OSError:
            pidfd = None
        poller = select.poll()
        poller.register(self.status, 0)  # POLLERR: the host's end of the status pipe is gone
        for fd in (self.host, self.worker) + ((self.terminate,) if self.terminate is not None else ()):
            poller.register(fd, select.POLLIN)
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        reason = None
        try:
            while reason is None:
                for fd, _ in poller.poll(None if pidfd is not None else 200):
                    if fd == self.status:
                        reason = "host gone"
                    elif fd == self.terminate:
                        reason = "killed"
                    elif fd == self.host:
                        reason = self._from_host()
                    elif fd == self.worker:
                        reason = self._from_worker(poller)
                    if reason is not None:
                        break
                done, wait_status, usage = os.wait4(self.pid, os.WNOHANG)
                if done:
                    return wait_status, usage, "exited"
            return processes.kill_and_reap(self.pid, reason)
        finally:
            if pidfd is not None:
                os.close(pidfd)

    # -- the host's side -------------------------------------------------------------------------------
    def _from_host(self) -> str | None:
        try:
            chunk = os.read(self.host, 1 << 16)
        except BlockingIOError:
            return None
        except OSError:
            chunk = b""
        if not chunk:
            return "closed"  # the host ended the session
        try:
            frames = self.host_frames.feed(chunk)
        except framing.ProtocolError:
            return "bad request"
        for frame in frames:
            if not _valid_request(frame) or self.run_nonce is not None or not self.hello_sent:
                return "bad request"
            self.run_nonce = frame["run"]
            self.worker_nonce = secrets.token_hex(16)
            self._thaw()
            framing.send_frame(self.worker, {"op": "run", "code": frame["code"], "timeout": frame["timeout"],
                                             "run": self.worker_nonce})
        return None

    def _reply(self, obj: dict) -> None:
        framing.send_frame(self.host, {"run": self.run_nonce, **obj})
        self.run_nonce = self.worker_nonce = None

    # -- the worker's side -----------------------------------------------------------------------------
    def _from_worker(self, poller: select.poll) -> str | None:
        try:
            chunk = os.read(self.worker, 1 << 16)
        except BlockingIOError:
            return None
        except OSError:
            chunk = b""
        if not chunk:
            poller.unregister(self.worker)  # W is exiting (or closed fd 3): its exit decides
            return None
        try:
            frames = self.worker_frames.feed(chunk)
        except framing.ProtocolError as e:
            return self._broken(f"bad frame ({e})")
        for frame in frames:
            if not self.hello_sent:
                framing.send_frame(self.host, frame)  # sent before any cell ran: W's own report
                if frame.get("hello") is not True:
                    return "setup failed"
                self.hello_sent = True
                continue
            if self.run_nonce is None or frame.get("run") != self.worker_nonce:
                continue  # not the current run's result (a cell writing to fd 3 without the nonce)
            try:
                result = valid_result(frame)
            except Broken as e:
                return self._broken(str(e))
            if not self._freeze():
                result["session_ends"] = True  # something of the session could not be stopped
            self._reply(result)
        return None

    def _broken(self, why: str) -> str:
        if self.run_nonce is not None:
            self._reply({"broken": limits.one_line(why, 200)})
        return "protocol"

    # -- freezing ------------------------------------------------------------------------------------
    def _session_processes(self) -> list[tuple[int, str]]:
        return processes.descendants_with_state(os.getpid())

    def _freeze(self) -> bool:
        """Stop every process of the session; True when all of them are stopped."""
        self.frozen = True
        if not iso.IS_LINUX:  # no /proc (macOS): the worker's process group (W called setsid)
            processes.ignore_errors(os.killpg, self.pid, signal.SIGSTOP)
            return True
        if self.plan["pidns"]:
            processes.ignore_errors(os.kill, -1, signal.SIGSTOP)  # PID 1: the namespace, atomically
        deadline = time.monotonic() + FREEZE_TIMEOUT_S
        while True:
            running = [pid for pid, state in self._session_processes() if state not in _STOPPED_STATES]
            if not running:
                self.frozen = True
                return True
            if time.monotonic() > deadline:
                for pid in running:
                    processes.ignore_errors(os.kill, pid, signal.SIGKILL)
                self.frozen = True
                return self.pid not in running
            for pid in running:
                processes.ignore_errors(os.kill, pid, signal.SIGSTOP)
            time.sleep(0.0002)

    def _thaw(self) -> None:
        if not self.frozen:
            return
        self.frozen = False
        if not iso.IS_LINUX:
            processes.ignore_errors(os.killpg, self.pid, signal.SIGCONT)
            return
        if self.plan["pidns"]:
            processes.ignore_errors(os.kill, -1, signal.SIGCONT)
            return
        for pid, _ in self._session_processes():
            processes.ignore_errors(os.kill, pid, signal.SIGCONT)
