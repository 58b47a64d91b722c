"""The sandbox's fixed limits and numbers, in one place for the host and the sandboxed side.

Standard library only, like every module the sandboxed side imports (see worker.py).
"""

# Per-run and per-session defaults of a Sandbox (each can be set per Sandbox).
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_MB = 1024
DEFAULT_OUTPUT_LIMIT = 64 * 1024  # bytes kept per stream and run
DEFAULT_DISK_MB = 128
DEFAULT_MAX_PROCESSES = 64
DEFAULT_MAX_OPEN_FILES = 256
# The smallest values a Sandbox accepts.
MIN_MEMORY_MB, MIN_DISK_MB, MIN_MAX_PROCESSES, MIN_MAX_OPEN_FILES = 32, 1, 2, 16

SERVER_START_TIMEOUT_S = 60.0  # importing sympy on a loaded machine can take seconds
SESSION_START_TIMEOUT_S = 30.0
KILL_GRACE_S = 3.0  # how long a session supervisor gets to clean up before SIGKILL
SESSION_CPU_BUDGET_S = 3600  # hard RLIMIT_CPU per session; the per-run soft limit is a courtesy the cell can
# raise: runs are bounded by the host's wall-clock deadline and the relay's stop between runs
CLEANUP_ALARM_S = 20  # a supervisor's cleanup after its worker must never hang the session's end

MAX_FRAME_BYTES = 1 << 20  # the largest control frame the host accepts from an (untrusted) worker
ERROR_LINE_CHARS = 500  # an error line from the worker is cut to this many characters

SANDBOX_DIR = "/opt/duet-sandbox"  # where bubblewrap binds the sandboxed side's modules
SESSION_UID_BASE, SESSION_UID_SPAN = 1_500_000_000, 400_000_000  # as root: one unprivileged uid per session
EXIT_SETUP_FAILED = 70

# W's file descriptors: stdin /dev/null, 1/2 the run's output pipes, 3 control socket,
# 4/5 private copies of the output pipes, restored on 1/2 after every run.
CTRL_FD, SAVED_OUT_FD, SAVED_ERR_FD = 3, 4, 5


def one_line(value: object, limit: int = ERROR_LINE_CHARS) -> str:
    """`value` as text on one line, cut to `limit` characters."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
