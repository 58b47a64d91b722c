"""The REPL in process W: runs each cell with capped output and a CPU limit, reports to the relay (fd 3).

Runs on the sandboxed side; standard library only.
"""

from __future__ import annotations

import ast
import builtins
import ctypes
import errno
import io
import linecache
import math
import os
import resource
import sys
import traceback
import types

if __package__:
    from . import framing, limits, processes
    from . import isolation as iso
else:  # imported by worker.py run as a script, which put this directory on sys.path
    import framing
    import isolation as iso
    import limits
    import processes

# The worker's own reference: a cell that monkey-patches os._exit cannot keep the worker alive.
_hard_exit = os._exit


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


class Repl:
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
                got = framing.recv_frame(limits.CTRL_FD)
            except (OSError, ValueError):
                got = None
            if got is None:
                _hard_exit(0)  # host closed the session: no atexit, no __del__, no lingering threads
            request, _ = got
            if not isinstance(request, dict) or request.get("op") != "run":
                _hard_exit(0)
            reply = self.run(str(request.get("code", "")), float(request.get("timeout", 5)))
            self._after_run()
            reply["run"] = str(request.get("run", ""))  # the relay's nonce for this run (not the host's)
            try:
                framing.send_frame(limits.CTRL_FD, reply)
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
            processes.kill_descendants(self.plan, self_is_worker=True)
        self._install_streams()
        for stream in (self.stdout, self.stderr):
            try:
                stream.flush()
            except OSError:
                pass
        if self._libc is not None:
            self._libc.fflush(None)  # C-level printf from ctypes or extensions
        for saved, fd in ((limits.SAVED_OUT_FD, 1), (limits.SAVED_ERR_FD, 2)):
            try:
                os.dup2(saved, fd)  # the cell may have closed or redirected 1/2
            except OSError:
                pass


def _last_line(exc: BaseException) -> str:
    """The exception's last traceback line, on one line ("ZeroDivisionError: division by zero")."""
    try:
        lines = traceback.format_exception_only(type(exc), exc)
        text = lines[-1] if lines else type(exc).__name__
    except BaseException:  # noqa: BLE001
        text = type(exc).__name__
    return limits.one_line(text)

