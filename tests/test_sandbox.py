"""The sandbox against real attacks, in real processes.

Every attack must be contained with a clear one-line error, leave the host and other sessions
unharmed, change no file outside the sandbox, and leave the sandbox usable for the next run.
Each test names the layer its defence comes from; a layer's test is skipped, with the reason
describe_isolation() gives, only where that layer is absent. The layers:

  rlimits   separate process, empty env, deadline + kill, rlimits, output caps; as root an
            unprivileged uid per session (layer 1, always)
  bwrap     bubblewrap + per-session PID/mount/IPC/network namespaces (layer 2)
  landlock  Landlock filesystem/TCP/signal rules (layer 3)
  seccomp   seccomp syscall filter (layer 3)

To see one layer on its own, tests switch the stacked ones off with ``skip_layers``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from duet.sandbox import (
    ISOLATION_LEVELS,
    RunResult,
    Sandbox,
    SandboxError,
    chosen_isolation,
    describe_isolation,
    shutdown_servers,
)
from duet.sandbox import servers as sandbox_servers

LAYERS = {layer["name"]: layer for layer in describe_isolation()}
IS_ROOT = os.geteuid() == 0
PROJECT = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")


def _mode(name: str, reason: str | None = None) -> pytest.param:
    """A parametrize value for an isolation mode, skipped with describe_isolation()'s reason."""
    available = {
        "none": True,
        "rlimits": True,
        "bwrap": LAYERS["bwrap"]["available"],
        "landlock": LAYERS["landlock"]["available"] or LAYERS["seccomp"]["available"],
    }[name]
    why = reason or f"{name} layer unavailable here: {LAYERS.get(name, {}).get('detail', '')}"
    return pytest.param(name, id=name, marks=pytest.mark.skipif(not available, reason=why))


NONE, RLIMITS, LANDLOCK, BWRAP = (_mode(m) for m in ("none", "rlimits", "landlock", "bwrap"))
ALL_MODES = [NONE, RLIMITS, LANDLOCK, BWRAP]
CONFINED_MODES = [RLIMITS, LANDLOCK, BWRAP]
# As root the rlimits layer includes a per-session unprivileged uid; as a normal user it cannot.
RLIMITS_UID = pytest.param("rlimits", id="rlimits-uid", marks=pytest.mark.skipif(
    not IS_ROOT, reason="the per-session uid is only used (and only possible) when running as root"))

needs_landlock = pytest.mark.skipif(not LAYERS["landlock"]["available"], reason=LAYERS["landlock"]["detail"])
needs_landlock_tcp = pytest.mark.skipif(
    "no TCP" not in LAYERS["landlock"]["detail"], reason=f"Landlock without TCP rules: {LAYERS['landlock']['detail']}")
needs_seccomp = pytest.mark.skipif(not LAYERS["seccomp"]["available"], reason=LAYERS["seccomp"]["detail"])
needs_bwrap = pytest.mark.skipif(not LAYERS["bwrap"]["available"], reason=LAYERS["bwrap"]["detail"])
needs_proc = pytest.mark.skipif(not LINUX, reason="inspects /proc")


def processes_with(marker: str) -> list[int]:
    """Host processes whose command line or name contains `marker` (zombies included)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{name}/comm", "rb") as f:
                comm = f.read()
        except OSError:
            continue
        if marker.encode() in cmdline or marker.encode() in comm:
            found.append(int(name))
    return found


def assert_recovers(sb: Sandbox, *, state_lost: bool) -> None:
    """The next run works; it reports lost state exactly when the previous one killed the session."""
    r = sb.run("print('alive', 6 * 7)")
    assert r.ok, r
    assert r.stdout == "alive 42\n"
    assert r.state_lost is state_lost
    if state_lost:
        assert "previous one ended" in r.stderr


# ------------------------------------------------------------------------------------------- basics
def test_state_persists_across_runs_like_notebook_cells():
    with Sandbox(timeout=5) as sb:
        assert sb.run("import fractions\nx = 41\ndef inc(v):\n    return v + 1").ok
        r = sb.run("print(inc(x), fractions.Fraction(1, 3) * 3)")
        assert (r.ok, r.stdout, r.error, r.state_lost) == (True, "42 1\n", None, False)
        assert isinstance(r, RunResult) and r.seconds > 0


def test_bare_last_expression_is_echoed():
    with Sandbox(timeout=5) as sb:
        assert sb.run("y = 2\ny * 21").stdout == "42\n"
        assert sb.run("y = 3").stdout == ""
        assert sb.run("None").stdout == ""
        assert sb.run("print('a')\n'b'").stdout == "a\n'b'\n"


def test_heavy_modules_are_preloaded_warm():
    """The fork server imported them before forking, so a step that uses them costs nothing extra."""
    with Sandbox(timeout=5) as sb:
        r = sb.run("import sys\n[m for m in ('math', 'fractions', 'itertools', 'sympy') if m not in sys.modules]")
        assert r.stdout == "[]\n", r
        r = sb.run("import sympy\nx = sympy.Symbol('x')\nsympy.factor(x**2 - 1)")
        assert r.stdout == "(x - 1)*(x + 1)\n", r


@pytest.mark.parametrize("mode", ALL_MODES)
def test_modules_not_preloaded_still_import(mode):
    """Lazy imports read the interpreter's files, which every layer must leave readable."""
    with Sandbox(timeout=10, isolation=mode) as sb:
        r = sb.run("import encodings.idna, wave, ctypes.util, json, subprocess, sympy.combinatorics\nprint('ok')")
        assert (r.ok, r.stdout) == (True, "ok\n"), r


def test_exception_gives_one_line_error_and_a_traceback_of_the_cell():
    with Sandbox(timeout=5) as sb:
        assert sb.run("def f(d):\n    return 1 / d\nkeep = 'me'").ok
        r = sb.run("f(0)")
        assert (r.ok, r.error) == (False, "ZeroDivisionError: division by zero")
        assert 'File "<cell 2>", line 1' in r.stderr and 'File "<cell 1>", line 2, in f' in r.stderr
        assert "return 1 / d" in r.stderr  # the cell's source is shown, like in a REPL
        assert "sandbox" not in r.stderr  # no frames of the worker itself
        assert sb.run("print(keep)").stdout == "me\n"  # an exception does not cost the state


def test_error_is_always_one_line():
    with Sandbox(timeout=5) as sb:
        r = sb.run("raise ValueError('first\\nsecond\\nthird')")
        assert r.error == "ValueError: first second third"
        r = sb.run("def broken(:\n    pass")
        assert r.error is not None and r.error.startswith("SyntaxError") and "\n" not in r.error
        assert "<cell 2>" in r.stderr


def test_sys_exit_is_an_exception_not_a_dead_session():
    with Sandbox(timeout=5) as sb:
        sb.run("kept = 1")
        r = sb.run("import sys\nsys.exit(2)")
        assert (r.ok, r.error) == (False, "SystemExit: 2")
        assert sb.run("print(kept)").stdout == "1\n"


def test_unicode_and_large_code_round_trip():
    with Sandbox(timeout=10) as sb:
        assert sb.run("print('é ∑ 😀')").stdout == "é ∑ 😀\n"
        big = "total = 0\n" + "total += 1\n" * 50_000 + "print(total)"
        assert sb.run(big).stdout == "50000\n"


def test_restart_drops_state_on_purpose_and_close_is_final():
    sb = Sandbox(timeout=5)
    sb.run("z = 1")
    sb.restart()
    r = sb.run("z")
    assert r.error == "NameError: name 'z' is not defined" and not r.state_lost
    sb.close()
    sb.close()  # twice is fine
    with pytest.raises(SandboxError):
        sb.run("1")


def test_bad_configuration_is_refused_clearly():
    with pytest.raises(ValueError):
        Sandbox(isolation="chroot")
    with pytest.raises(ValueError):
        Sandbox(skip_layers={"bwrap"})
    with pytest.raises(ValueError):
        Sandbox(timeout=0)
    with Sandbox(memory_mb=40, isolation="rlimits") as sb, pytest.raises(SandboxError, match="too small"):
        sb.run("1")


def test_describe_isolation_and_chosen_layer_agree():
    layers = describe_isolation()
    assert [layer["name"] for layer in layers] == ["rlimits", "memory", "bwrap", "landlock", "seccomp"]
    for layer in layers:
        assert set(layer) == {"name", "available", "used", "detail"} and "\n" not in layer["detail"]
        assert not layer["used"] or layer["available"]
    chosen = chosen_isolation()
    assert chosen in ISOLATION_LEVELS
    with Sandbox() as sb:
        assert sb.isolation == chosen
        sb.start()
        used = {layer["name"] for layer in layers if layer["used"]} - {"rlimits", "memory"}
        assert set(sb.layers) - {"process"} == used


def test_concurrent_sandboxes_are_isolated_and_each_is_thread_safe():
    errors: list[str] = []

    def own_sandbox(i: int) -> None:
        with Sandbox(timeout=10) as sb:
            sb.run(f"mine = {i}")
            for _ in range(5):
                r = sb.run("mine")
                if r.stdout != f"{i}\n":
                    errors.append(f"{i}: {r}")

    threads = [threading.Thread(target=own_sandbox, args=(i,)) for i in range(8)]
    with Sandbox(timeout=10) as shared:
        shared.run("count = 0")
        threads += [threading.Thread(target=lambda: [shared.run("count += 1") for _ in range(10)]) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert shared.run("count").stdout == "40\n"
    assert errors == []


def test_work_dir_is_fresh_private_and_removed():
    """Layer 1 (a temp dir per session, removed at close); with bwrap a tmpfs that dies with the session."""
    with Sandbox(timeout=5) as sb:
        r = sb.run("import os\nopen('note.txt', 'w').write('hi')\nprint(os.getcwd())\nsorted(os.listdir('.'))")
        workdir = r.stdout.splitlines()[0]
        assert r.stdout.splitlines()[1] == "['note.txt']"
    with Sandbox(timeout=5) as other:
        assert other.run("import os\nos.listdir('.')").stdout == "[]\n"
    if sb.isolation != "bwrap":  # with bwrap the path is inside the sandbox's own /tmp
        assert not os.path.exists(workdir)


# -------------------------------------------------------------------------------------- containment
@pytest.mark.parametrize("mode", ALL_MODES)
def test_infinite_loop_times_out(mode):
    """Layer 1: the wall-clock deadline, then the whole session is killed and reaped."""
    with Sandbox(timeout=1, isolation=mode) as sb:
        sb.run("before = 1")
        r = sb.run("while True:\n    pass")
        assert (r.ok, r.error) == (False, "timed out after 1 s")
        assert r.seconds < 3
        assert_recovers(sb, state_lost=True)
        assert sb.run("before").error == "NameError: name 'before' is not defined"


@needs_proc
@pytest.mark.parametrize("mode", CONFINED_MODES)
def test_ignoring_sigterm_does_not_help(mode):
    """Layer 1: the session is ended with SIGKILL (after its supervisor's SIGTERM), children included."""
    marker = f"ignterm{uuid.uuid4().hex[:8]}"
    code = (
        "import ctypes, os, signal\n"
        f"ctypes.CDLL(None).prctl(15, b'{marker}', 0, 0, 0)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "if os.fork() == 0:\n"
        "    while True:\n        pass\n"
        "while True:\n    pass\n"
    )
    with Sandbox(timeout=1, isolation=mode) as sb:
        r = sb.run(code)
        assert r.error == "timed out after 1 s"
        assert processes_with(marker) == []
        assert_recovers(sb, state_lost=True)


@pytest.mark.parametrize("mode", [RLIMITS, BWRAP])
def test_memory_bomb_hits_the_memory_limit(mode):
    """Layer 1: RLIMIT_AS; the session then starts afresh (its state may be huge or inconsistent)."""
    with Sandbox(timeout=10, memory_mb=256, isolation=mode) as sb:
        r = sb.run("x = bytearray(4 * 10**9)")
        assert (r.ok, r.error) == (False, "memory limit 256 MB exceeded")
        assert "MemoryError" in r.stderr
        assert_recovers(sb, state_lost=True)
        r = sb.run("hog = []\nwhile True:\n    hog.append(' ' * 10**6)")
        assert r.error == "memory limit 256 MB exceeded"
        assert_recovers(sb, state_lost=True)


@needs_proc
@pytest.mark.parametrize("mode", [RLIMITS_UID, LANDLOCK, BWRAP])
def test_fork_bomb_is_capped_and_leaves_nothing_behind(mode):
    """Layer 1: RLIMIT_NPROC per session (own uid as root, or own user namespace with bwrap), and
    the kill of the whole session; with bwrap also its PID namespace."""
    marker = f"bomb{uuid.uuid4().hex[:8]}"
    name = f"ctypes.CDLL(None).prctl(15, b'{marker}', 0, 0, 0)"
    count_forks = (
        "import ctypes, os, time\nn = 0\n"
        "try:\n"
        "    while n < 1000:\n"
        "        if os.fork() == 0:\n"
        f"            {name}\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print(n, e.errno)\n"
    )
    bomb = f"import ctypes, os\n{name}\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    with Sandbox(timeout=2, max_processes=16, isolation=mode) as sb:
        r = sb.run(count_forks)
        forked, err = r.stdout.split()
        assert int(forked) < 16 and err == "11", r  # EAGAIN well before 1000
        assert processes_with(marker) == []  # the sleeping children did not outlive the run
        r = sb.run(bomb)
        assert r.error == "timed out after 2 s"
        assert processes_with(marker) == []
        assert_recovers(sb, state_lost=True)


@pytest.mark.parametrize("mode", [RLIMITS, BWRAP])
def test_two_gigabyte_file_hits_the_file_size_limit(mode):
    """Layer 1: RLIMIT_FSIZE (Python turns SIGXFSZ into EFBIG); with bwrap also a size-capped tmpfs."""
    with Sandbox(timeout=20, disk_mb=32, isolation=mode) as sb:
        sb.run("kept = 1")
        r = sb.run("chunk = b'x' * 2**20\nwith open('big', 'wb') as f:\n    for _ in range(2048):\n"
                   "        f.write(chunk)")
        assert (r.ok, r.error) == (False, "file size limit 32 MB exceeded")
        r = sb.run("import os\nprint(os.path.getsize('big') <= 32 * 2**20, kept)")
        assert r.stdout == "True 1\n"
        assert_recovers(sb, state_lost=False)


@pytest.mark.parametrize("how", [
    "import sys\nsys.stdout.write('x' * 100_000_000)",
    "import os\nchunk = b'y' * 2**20\nfor _ in range(100):\n    os.write(1, chunk)",
    "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'yes | head -c 100000000'])",
    "import sys\nfor _ in range(1_000_000):\n    print('z' * 99, file=sys.stderr)",
], ids=["print", "fd-write", "subprocess", "stderr"])
def test_100_mb_of_output_is_drained_and_capped(how):
    """Layer 1: both pipes are drained while the code runs (no deadlock) and capped at 64 KB each."""
    with Sandbox(timeout=20) as sb:
        r = sb.run(how + "\nprint('done')")
        assert (r.ok, r.error, r.truncated) == (True, "output truncated at 64 KB", True), r.error
        assert len(r.stdout.encode()) <= 64 * 1024 and len(r.stderr.encode()) <= 64 * 1024
        assert len(r.stdout) + len(r.stderr) >= 64 * 1024
        assert_recovers(sb, state_lost=False)


def test_output_limit_is_configurable():
    with Sandbox(timeout=5, output_limit=1000) as sb:
        r = sb.run("print('q' * 5000)")
        assert (r.error, len(r.stdout)) == ("output truncated at 1000 bytes", 1000)


@pytest.fixture
def tcp_listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.setblocking(False)
    yield server
    server.close()


@pytest.mark.parametrize("mode, skip, expected", [
    pytest.param("bwrap", {"landlock", "seccomp"}, "Network is unreachable", id="bwrap:network-namespace",
                 marks=needs_bwrap),
    pytest.param("landlock", {"seccomp"}, "Permission denied", id="landlock:tcp-rules",
                 marks=[needs_landlock, needs_landlock_tcp]),
    pytest.param("landlock", {"landlock"}, "Operation not permitted", id="seccomp:no-inet-sockets",
                 marks=needs_seccomp),
])
def test_tcp_connect_to_a_host_listener_is_refused(tcp_listener, mode, skip, expected):
    port = tcp_listener.getsockname()[1]
    with Sandbox(timeout=5, isolation=mode, skip_layers=skip) as sb:
        r = sb.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert r.error is not None and expected in r.error, r.error
        with pytest.raises(BlockingIOError):
            tcp_listener.accept()  # nothing ever connected
        assert_recovers(sb, state_lost=False)


@pytest.mark.parametrize("mode, skip, expected", [
    pytest.param("bwrap", {"landlock", "seccomp"}, "Network is unreachable", id="bwrap:network-namespace",
                 marks=needs_bwrap),
    pytest.param("landlock", {"landlock"}, "Operation not permitted", id="seccomp:no-inet-sockets",
                 marks=needs_seccomp),
])
def test_udp_send_to_the_host_is_refused(mode, skip, expected):
    """Landlock has no UDP rules, so UDP is stopped by the network namespace or by seccomp."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    port = receiver.getsockname()[1]
    try:
        with Sandbox(timeout=5, isolation=mode, skip_layers=skip) as sb:
            r = sb.run(f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                       f"s.sendto(b'leak', ('127.0.0.1', {port}))")
            assert r.error is not None and expected in r.error, r.error
            with pytest.raises(BlockingIOError):
                receiver.recv(100)
    finally:
        receiver.close()


@needs_proc
@pytest.mark.parametrize("mode", ALL_MODES)
def test_environment_secrets_do_not_reach_the_code(mode, monkeypatch):
    """Layer 1: an empty environment. Reading the host's /proc/<pid>/environ instead is stopped by the
    session's own uid (root), Landlock's ptrace scoping, or with bwrap by not seeing the host at all;
    isolation='none' only promises the first."""
    secret = f"sk-{uuid.uuid4().hex}"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("DUET_TEST_SECRET", secret)
    shutdown_servers()  # the fork server must start while the secret is in our environment
    code = (
        "import os\nprint(dict(os.environ))\n"
        f"for pid in (os.getppid(), 1, {os.getpid()}, {os.getppid()}):\n"
        "    try:\n"
        "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n"
        "        print('denied', pid, e.errno)\n"
    )
    with Sandbox(timeout=5, isolation=mode) as sb:
        r = sb.run(code if mode != "none" else "import os\nprint(dict(os.environ))")
        assert r.ok, r
        assert secret not in r.stdout and "OPENAI_API_KEY" not in r.stdout


@pytest.fixture
def home_secret():
    path = Path.home() / f".duet-sandbox-secret-{uuid.uuid4().hex[:8]}"
    secret = f"secret-{uuid.uuid4().hex}"
    path.write_text(secret)
    try:
        yield path, secret
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("mode", [
    pytest.param("landlock", id="landlock", marks=needs_landlock),
    pytest.param("bwrap", id="bwrap", marks=needs_bwrap),
])
def test_home_and_project_files_are_unreadable(mode, home_secret):
    """Landlock allows reading only the system and the interpreter; bwrap does not even show them."""
    path, secret = home_secret
    project_file = PROJECT / "pyproject.toml"
    code = (
        "import os\n"
        f"for p in ({str(path)!r}, {str(project_file)!r}, {str(PROJECT / 'duet' / 'cli.py')!r}):\n"
        "    try:\n        print(open(p).read())\n    except OSError as e:\n        print(type(e).__name__)\n"
        f"for d in ({str(Path.home())!r}, {str(PROJECT)!r}):\n"
        "    try:\n        print(os.listdir(d))\n    except OSError as e:\n        print(type(e).__name__)\n"
    )
    with Sandbox(timeout=5, isolation=mode) as sb:
        r = sb.run(code)
        assert r.ok, r
        # Landlock answers EACCES; with bwrap the files do not exist (only the mount points on the way
        # to the interpreter do, and Landlock keeps those unlistable).
        assert set(r.stdout.split()) <= {"PermissionError", "FileNotFoundError"} and len(r.stdout.split()) == 5
        assert secret not in r.stdout and "build-system" not in r.stdout


@pytest.mark.parametrize("mode", [
    pytest.param("landlock", id="landlock", marks=needs_landlock),
    pytest.param("bwrap", id="bwrap", marks=needs_bwrap),
    RLIMITS_UID,
])
def test_files_outside_the_work_dir_cannot_be_written_or_deleted(mode, tmp_path, home_secret):
    """Landlock: write only the work dir. bwrap: nothing outside is even visible. As root, the
    session's unprivileged uid alone already stops it (DAC, layer 1)."""
    canary = tmp_path / "canary.txt"
    canary.write_text("original")
    home_file, secret = home_secret
    project_file = PROJECT / "pyproject.toml"
    project_hash = hashlib.sha256(project_file.read_bytes()).hexdigest()
    targets = [str(canary), str(home_file), str(project_file)]
    code = (
        "import os, shutil\n"
        f"for p in {targets!r}:\n"
        "    for attempt in (lambda: open(p, 'w').write('pwned'), lambda: os.remove(p),\n"
        "                    lambda: os.rename(p, p + '.moved'), lambda: os.chmod(p, 0o777)):\n"
        "        try:\n            attempt()\n            print('DID', p)\n"
        "        except OSError as e:\n            print(type(e).__name__)\n"
        f"for d in ({str(tmp_path)!r}, {str(Path.home())!r}, {str(PROJECT)!r}):\n"
        "    try:\n        open(os.path.join(d, 'dropped.txt'), 'w').write('x')\n        print('DID', d)\n"
        "    except OSError as e:\n        print(type(e).__name__)\n"
        f"try:\n    shutil.rmtree({str(tmp_path)!r})\nexcept OSError as e:\n    print(type(e).__name__)\n"
    )
    with Sandbox(timeout=5, isolation=mode) as sb:
        r = sb.run(code)
        assert "DID" not in r.stdout, r.stdout
        assert_recovers(sb, state_lost=False)
    assert canary.read_text() == "original" and home_file.read_text() == secret
    assert hashlib.sha256(project_file.read_bytes()).hexdigest() == project_hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canary.txt"]
    assert not (Path.home() / "dropped.txt").exists() and not (PROJECT / "dropped.txt").exists()


@needs_proc
@pytest.mark.parametrize("mode", [RLIMITS_UID, LANDLOCK, BWRAP])
def test_killing_the_parent_or_everyone_harms_nobody(mode):
    """The session cannot signal its supervisor, the fork server, the host or other sessions:
    own uid (root, layer 1), Landlock signal scope and seccomp (layer 3), own PID namespace (bwrap)."""
    host = os.getpid()
    with Sandbox(timeout=5, isolation=mode) as other, Sandbox(timeout=5, isolation=mode) as sb:
        other.run("precious = 'intact'")
        r = sb.run(
            "import os, signal\n"
            "ancestors, pid = [], os.getppid()\n"
            "while pid > 1:\n"  # supervisor, fork server, ... the host: whatever /proc lets us see
            "    ancestors.append(pid)\n"
            "    pid = int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1])\n"
            f"for pid in [*ancestors, *[-p for p in ancestors], {host}, -{host}, 1, -1]:\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
            "print('still here')"
        )
        assert r.stdout == "still here\n", r
        assert other.run("precious").stdout == "'intact'\n"  # fork server and other session unharmed
        assert_recovers(sb, state_lost=False)


def test_ctypes_segfault_is_reported_and_the_session_restarts():
    """Layer 1: the crash is confined to the session process; its supervisor reports the signal."""
    with Sandbox(timeout=5) as sb:
        sb.run("gone = 1")
        r = sb.run("import ctypes\nctypes.string_at(0)")
        assert not r.ok and r.error.startswith("session crashed: SIGSEGV"), r.error
        assert_recovers(sb, state_lost=True)


@pytest.mark.parametrize("status", [0, 3])
def test_os_exit_is_reported_and_the_session_restarts(status):
    with Sandbox(timeout=5) as sb:
        r = sb.run(f"import os\nprint('bye', flush=True)\nos._exit({status})")
        assert (r.ok, r.error, r.stdout) == (False, f"session exited with status {status}", "bye\n")
        assert_recovers(sb, state_lost=True)


@needs_proc
@pytest.mark.parametrize("mode", ALL_MODES)
def test_setsid_background_process_does_not_outlive_the_run(mode):
    """Layer 1 on Linux: the worker is a subreaper and sweeps its descendants after every run
    (kill(-1) confined by the PID namespace, the session uid or Landlock; else a /proc walk)."""
    marker = f"{uuid.uuid4().int % 10**6}.{os.getpid()}"
    code = (
        "import os, subprocess, time\n"
        f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
        "if os.fork() == 0:\n"  # a double-forked daemon in its own session
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execvp('sleep', ['sleep', '{marker}'])\n"
        "    os._exit(0)\n"
        "print('started')"
    )
    with Sandbox(timeout=5, isolation=mode) as sb:
        r = sb.run(code)
        assert r.stdout == "started\n", r
        assert processes_with(marker) == []
        assert_recovers(sb, state_lost=False)


@pytest.mark.parametrize("mode", [NONE, BWRAP])
def test_del_and_atexit_never_run_at_exit(mode, tmp_path):
    """Layer 1: the worker ends with os._exit, so no finalizer runs, and a hostile one cannot stall close()."""
    flag = tmp_path / "finalizer-ran"
    code = (
        "import atexit\n"
        "class Sticky:\n"
        "    def __del__(self):\n"
        f"        open({str(flag)!r}, 'w').write('ran')\n"
        "        while True:\n            pass\n"
        "keep = Sticky()\n"
        f"atexit.register(lambda: open({str(flag)!r}, 'w').write('ran'))\n"
    )
    sb = Sandbox(timeout=5, isolation=mode)
    assert sb.run(code).ok
    started = time.monotonic()
    sb.close()
    assert time.monotonic() - started < 2
    assert not flag.exists()


@pytest.mark.parametrize("mode", [LANDLOCK, BWRAP])
def test_one_session_cannot_tamper_with_another(mode):
    """Sessions are separate forked processes: monkey-patching sympy, builtins or sys.modules in
    one changes nothing elsewhere; the fork server's files are read-only, and another session's
    work dir is out of reach (Landlock, or a private tmpfs with bwrap)."""
    with Sandbox(timeout=10, isolation=mode) as first, Sandbox(timeout=10, isolation=mode) as second:
        r = first.run(
            "import builtins, os, sys, sympy\n"
            "sympy.sqrt = lambda x: 42\n"
            "builtins.len = lambda x: -1\n"
            "sys.modules['math'] = None\n"
            "try:\n    open(sympy.__file__, 'a').write('sqrt = None')\nexcept OSError as e:\n"
            "    print(type(e).__name__)\n"
            "open('mine.txt', 'w').write('first')\n"
            "print(os.path.abspath('mine.txt'))"
        )
        lines = r.stdout.split()
        assert lines[0] in ("PermissionError", "OSError"), r
        mine = lines[1]
        for sb in (second, Sandbox(timeout=10, isolation=mode)):
            with sb:
                r = sb.run(
                    "import sympy, math\n"
                    "print(sympy.sqrt(4), len('abc'), math.pi > 3)\n"
                    f"try:\n    print(open({mine!r}).read())\nexcept OSError as e:\n    print(type(e).__name__)"
                )
                assert r.stdout.split()[:3] == ["2", "3", "True"], r
                assert "first" not in r.stdout


def test_closing_fds_in_a_cell_does_not_break_the_session():
    with Sandbox(timeout=5) as sb:
        r = sb.run("import os, sys\nos.close(1)\nos.close(2)\nsys.stdout = None")
        assert r.ok, r
        assert_recovers(sb, state_lost=False)


def test_isolation_none_is_an_explicit_opt_out_that_still_times_out():
    with Sandbox(timeout=1, isolation="none") as sb:
        sb.start()
        assert sb.layers == ("process",)
        assert sb.run("while True:\n    pass").error == "timed out after 1 s"


def test_fork_servers_are_shared_and_restarted_when_they_die():
    with Sandbox(timeout=5, isolation="rlimits") as sb:
        sb.start()
        server = sandbox_servers._servers["rlimits"]
        assert Sandbox(isolation="rlimits").run("1").stdout == "1\n"
        assert sandbox_servers._servers["rlimits"] is server  # one server for both
        server.process.kill()
        server.process.wait()
        assert sb.run("print('still')").stdout == "still\n"  # a running session outlives its server
        with Sandbox(timeout=5, isolation="rlimits") as fresh:
            assert fresh.run("1 + 1").stdout == "2\n"
            assert sandbox_servers._servers["rlimits"] is not server
        # replacing the dead server did not pull the old session's work dir from under it
        assert sb.run("open('after.txt', 'w').write('ok')").stdout == "2\n"
    assert not os.path.exists(server.base_dir)  # the last one out removed the old server's dir


def test_functions_defined_in_cells_pickle_like_in_a_script():
    """The cells share a real __main__ module, so pickle and multiprocessing find their functions."""
    with Sandbox(timeout=10) as sb:
        r = sb.run("import pickle\ndef double(x):\n    return 2 * x\npickle.loads(pickle.dumps(double)) is double")
        assert r.stdout == "True\n", r


@needs_bwrap
def test_multiprocessing_works_inside_bwrap():
    """Each bwrap session has a private /dev/shm, so multiprocessing's semaphores work there."""
    with Sandbox(timeout=20, isolation="bwrap") as sb:
        r = sb.run("from concurrent.futures import ProcessPoolExecutor\ndef sq(x):\n    return x * x\n"
                   "with ProcessPoolExecutor(2) as ex:\n    print(list(ex.map(sq, range(5))))")
        assert r.stdout == "[0, 1, 4, 9, 16]\n", r


@needs_proc
@pytest.mark.parametrize("mode", ALL_MODES)
def test_the_worker_holds_only_its_own_file_descriptors(mode):
    """Nothing of the fork server (its channel to the host) or of other sessions leaks into a session."""
    with Sandbox(timeout=5, isolation=mode) as sb:
        r = sb.run("import os\nsorted(int(fd) for fd in os.listdir('/proc/self/fd'))")
        assert r.stdout == "[0, 1, 2, 3, 4, 5, 6]\n", r  # 6 is listdir's own


def test_close_from_another_thread_ends_a_running_cell():
    sb = Sandbox(timeout=60)
    sb.start()
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(sb.run("while True:\n    pass"))
        except SandboxError as e:
            outcome.append(e)

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + 10
    while sb._lock.acquire(blocking=False):  # wait until the run holds the sandbox
        sb._lock.release()
        assert time.monotonic() < deadline
        time.sleep(0.001)
    started = time.monotonic()
    sb.close()
    runner.join(10)
    assert time.monotonic() - started < 5
    assert isinstance(outcome[0], RunResult) and outcome[0].error == "the sandbox was closed during the run"


@pytest.mark.parametrize("garbage", [
    "struct.pack('!I', 2**31) + b'x' * 100_000",  # claims a 2 GB frame: the host must not buffer it
    "struct.pack('!I', 100_000) + b'[' * 100_000",  # nests too deep to decode
], ids=["huge-frame", "deep-json"])
def test_garbage_on_the_control_socket_is_contained(garbage):
    """The cell can write to the worker's control socket; the host treats what comes from it as
    untrusted: bounded frames, replies matched to the run, errors one line."""
    with Sandbox(timeout=5) as sb:
        r = sb.run(f"import os, struct\nos.write(3, {garbage})")
        assert (r.ok, r.error) == (False, "the session broke the sandbox protocol")
        assert_recovers(sb, state_lost=True)
        forged = "json.dumps({'ok': True, 'error': 'forged', 'run': 'guess'}).encode()"
        r = sb.run(f"import json, os, struct\nb = {forged}\nos.write(3, struct.pack('!I', len(b)) + b)\n1 / 0")
        assert r.error == "ZeroDivisionError: division by zero"  # the forged reply was not taken


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_host_process_gets_its_own_sessions():
    """Batch evaluation may fork the host: the child must not talk over the parent's sockets."""
    with Sandbox(timeout=10, isolation="rlimits") as sb:
        sb.run("owner = 'parent'")
        pid = os.fork()
        if pid == 0:  # the child: inherited sandbox starts afresh, the parent's session untouched
            try:
                r = sb.run("print(globals().get('owner'))")
                fresh = Sandbox(timeout=10, isolation="rlimits").run("print('child')")
                os._exit(0 if (r.stdout, fresh.stdout) == ("None\n", "child\n") else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert sb.run("owner").stdout == "'parent'\n"


# ---------------------------------------------------------------------------------------------------
# Issue 19: what got through the red-team of the default sandbox, each attack run for real.

STEAL_NONCE = (
    "import json, os, struct, sys\n"
    "f = sys._getframe()\n"
    "while f is not None and f.f_code.co_name != 'serve':\n"
    "    f = f.f_back\n"
    "nonce = f.f_locals['request']['run']\n"  # what the worker's serve loop was sent for this run
    "def send(frame):\n"
    "    b = json.dumps(frame).encode()\n"
    "    os.write(3, struct.pack('!I', len(b)) + b)\n"
)


def _name_this_process(marker: str) -> str:
    return ("import ctypes\n"
            f"ctypes.CDLL(None).prctl(15, ctypes.c_char_p({marker.encode()!r}), 0, 0, 0)\n")


def _state_and_cpu(pid: int) -> tuple[str, int]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return fields[0].decode(), int(fields[11]) + int(fields[12])


def _assert_frozen(marker: str, at_least: int = 1) -> None:
    """Every process named `marker` is stopped and burns no CPU for half a second."""
    pids = processes_with(marker)
    assert len(pids) >= at_least, pids
    before = {pid: _state_and_cpu(pid) for pid in pids}
    time.sleep(0.5)
    for pid, (state, cpu) in before.items():
        assert state in "TtZ", (pid, state)
        assert _state_and_cpu(pid)[1] == cpu, pid


@needs_proc
@pytest.mark.parametrize("mode", ALL_MODES)
def test_a_cell_that_forges_its_result_is_stopped_when_it_claims_to_be_done(mode):
    """Attack 1. The cell steals the nonce its worker was sent, raises its own CPU soft limit,
    reports success on fd 3 and keeps computing. The host's channel and nonce live in the relay,
    which no cell reaches; the forged report only ends the run early, and the relay stops every
    process of the session before the host hears of it. The cell stays stopped until the next
    run, which the host's wall clock then ends (the CPU soft limit it raised does not matter)."""
    marker = f"forge{uuid.uuid4().hex[:8]}"
    code = STEAL_NONCE + _name_this_process(marker) + (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_CPU)\n"
        "resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))\n"
        "print('forged', flush=True)\n"
        "send({'run': nonce, 'ok': True, 'error': None, 'kind': None, 'truncated': [False, False],"
        " 'session_ends': False})\n"
        "while True:\n    pass\n"
    )
    with Sandbox(timeout=3, isolation=mode) as sb:
        r = sb.run(code)
        assert r.stdout == "forged\n" and r.seconds < 3, r
        _assert_frozen(marker)
        r = sb.run("print('next')")  # the stopped loop continues, and the deadline ends it
        assert r.error == "timed out after 3 s" and r.stdout == "", r
        assert processes_with(marker) == []
        assert_recovers(sb, state_lost=True)


BAD_FRAMES = {
    "sentinels-5": "{'run': nonce, 'ok': True, 'error': None, 'kind': None, 'truncated': [False, False],"
                   " 'session_ends': False, 'sentinels': 5}",
    "truncated-7": "{'run': nonce, 'ok': True, 'error': None, 'kind': None, 'truncated': 7, 'session_ends': False}",
    "ok-string": "{'run': nonce, 'ok': 'yes', 'error': None, 'kind': None, 'truncated': [False, False],"
                 " 'session_ends': False}",
    "error-list": "{'run': nonce, 'ok': False, 'error': ['x'], 'kind': None, 'truncated': [False, False],"
                  " 'session_ends': False}",
}


@pytest.mark.parametrize("frame", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
@pytest.mark.parametrize("mode", [RLIMITS, BWRAP])
def test_a_forged_frame_with_wrong_types_is_a_clean_protocol_error(mode, frame):
    """Attack 2. A frame with the right nonce and wrong types is refused by the relay, field by
    field; the host gets a protocol error for that run, never an exception."""
    with Sandbox(timeout=5, isolation=mode) as sb:
        r = sb.run(STEAL_NONCE + f"send({frame})\nimport time\ntime.sleep(1)")
        assert (r.ok, r.error) == (False, "the session broke the sandbox protocol")
        assert_recovers(sb, state_lost=True)


def test_the_host_checks_every_reply_field_by_type():
    """Attack 2, the host's own check (defence in depth behind the relay's)."""
    from duet.sandbox.session import _checked_reply

    good = {"run": "n", "ok": True, "error": None, "kind": None, "truncated": [False, False], "session_ends": False}
    assert _checked_reply(dict(good)) == good
    for field, bad in (("truncated", 7), ("truncated", [1, 2]), ("ok", "yes"), ("error", 5), ("session_ends", None)):
        assert _checked_reply({**good, field: bad}) == {"broken": True}, field
    assert _checked_reply({**good, "sentinels": 5}) == {"broken": True}


from duet.sandbox import cgroups as sandbox_cgroups  # noqa: E402

HAS_MEMORY_CGROUP, MEMORY_BOUND = sandbox_cgroups.describe_memory_bound()
needs_memory_cgroup = pytest.mark.skipif(not HAS_MEMORY_CGROUP, reason=MEMORY_BOUND)


@needs_memory_cgroup
@pytest.mark.parametrize("mode", CONFINED_MODES)
def test_memory_limit_bounds_the_whole_session_not_each_process(mode):
    """Attack 3a. Five forked children of 700 MB each under memory_mb=1024: the session's memory
    cgroup lets at most one of them live (RLIMIT_AS alone allowed all five, 3.5 GB)."""
    code = (
        "import os, time\nkids = []\n"
        "for i in range(5):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        b = bytearray(700 << 20)\n"
        "        for j in range(0, len(b), 4096):\n            b[j] = 1\n"
        "        time.sleep(2)\n        os._exit(0)\n"
        "    kids.append(pid)\n"
        "print(sum(os.waitpid(k, 0)[1] == 0 for k in kids))\n"
    )
    with Sandbox(timeout=30, memory_mb=1024, isolation=mode) as sb:
        r = sb.run(code)
        if r.ok:
            assert int(r.stdout) <= 1, r
        else:  # the kernel may pick the worker itself
            assert r.error.startswith("memory limit 1024 MB exceeded"), r
        assert_recovers(sb, state_lost=not r.ok)


@needs_memory_cgroup
@pytest.mark.parametrize("mode", CONFINED_MODES)
def test_memfd_pages_count_against_the_session_memory_limit(mode):
    """Attack 3b. memfd_create memory counts against no address space; it counts in the cgroup."""
    code = (
        "import os\nheld, fds, chunk = 0, [], b'x' * (16 << 20)\n"
        "while held < (2 << 30):\n"
        "    fds.append(os.memfd_create('m'))\n"
        "    for _ in range(4):\n"
        "        os.write(fds[-1], chunk)\n        held += len(chunk)\n"
        "    print(held >> 20, flush=True)\n"
    )
    with Sandbox(timeout=30, memory_mb=512, isolation=mode) as sb:
        r = sb.run(code)
        assert not r.ok and r.error.startswith("memory limit 512 MB exceeded"), r
        assert max(int(n) for n in r.stdout.split()) <= 512
        assert_recovers(sb, state_lost=True)


@needs_proc
@pytest.mark.parametrize("mode", ALL_MODES)
def test_nothing_of_the_session_runs_between_runs(mode):
    """Attack 4. A daemon thread that keeps forking busy children outlives the post-run sweep; the
    relay stops all of them when the run ends, and the notebook state is still there after."""
    marker = f"busy{uuid.uuid4().hex[:8]}"
    code = (
        "import os, threading, time\n"
        "def spawn():\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            import ctypes\n"
        f"            ctypes.CDLL(None).prctl(15, ctypes.c_char_p({marker.encode()!r}), 0, 0, 0)\n"
        "            while True:\n                pass\n"
        "        time.sleep(0.05)\n"
        "threading.Thread(target=spawn, daemon=True).start()\n"
        "time.sleep(0.3)\nx = 41\n"
    ) + _name_this_process(marker + "w")  # the worker too (its daemon thread is inside it)
    with Sandbox(timeout=5, isolation=mode) as sb:
        r = sb.run(code)
        assert r.ok, r
        time.sleep(0.3)
        _assert_frozen(marker)
        r = sb.run("x + 1")
        assert (r.ok, r.stdout) == (True, "42\n"), r
    deadline = time.monotonic() + 5
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(marker) == []


@pytest.fixture
def root_only_files(home_secret):
    """0600 root-owned files: one in /root, one in a directory anyone may traverse, and /etc/shadow."""
    import tempfile

    path, secret = home_secret
    path.chmod(0o600)
    open_dir = Path(tempfile.mkdtemp(prefix="duet-open-", dir="/var/tmp"))
    open_dir.chmod(0o755)
    exposed = open_dir / "key"
    exposed.write_text(secret)
    exposed.chmod(0o600)
    try:
        yield [str(path), str(exposed), "/etc/shadow"], secret
    finally:
        exposed.unlink()
        open_dir.rmdir()


@pytest.mark.skipif(not IS_ROOT, reason="about running as root")
@pytest.mark.parametrize("mode, skip", [
    pytest.param("rlimits", (), id="rlimits"),
    pytest.param("landlock", ("landlock",), id="landlock-without-landlock", marks=needs_seccomp),
    pytest.param("landlock", (), id="landlock", marks=needs_landlock),
    pytest.param("bwrap", (), id="bwrap", marks=needs_bwrap),
])
def test_as_root_no_capability_survives_and_root_only_files_stay_unreadable(mode, skip, root_only_files,
                                                                            tcp_listener):
    """Attack 6. At every level the session's uid holds no capability (bounding set included) and
    has no_new_privs, so 0600 root files are unreadable; without bwrap, root's sessions also get a
    private network namespace and /root is an empty directory holding only the interpreter."""
    paths, secret = root_only_files
    port = tcp_listener.getsockname()[1]
    code = (
        "import socket\n"
        f"for p in {paths!r}:\n"
        "    try:\n        print(open(p).read())\n    except OSError as e:\n        print(type(e).__name__)\n"
        "print(''.join(l for l in open('/proc/self/status') if l.startswith(('Cap', 'NoNewPrivs'))))\n"
        f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    print('connected')\n"
        "except OSError as e:\n    print('refused')\n"
    )
    with Sandbox(timeout=10, isolation=mode, skip_layers=skip) as sb:
        r = sb.run(code)
        assert r.ok, r
        assert secret not in r.stdout and "root:" not in r.stdout, r.stdout
        lines = r.stdout.split("\n")
        assert set(lines[:3]) <= {"PermissionError", "FileNotFoundError"}, lines
        caps = dict(line.split(":\t") for line in lines[3:9])
        assert all(caps[f"Cap{k}"] == "0000000000000000" for k in ("Inh", "Prm", "Eff", "Bnd", "Amb")), caps
        assert caps["NoNewPrivs"] == "1"
        assert lines[-2] == "refused"
        assert sb.session_info["kept_caps"] == []
        with pytest.raises(BlockingIOError):
            tcp_listener.accept()
