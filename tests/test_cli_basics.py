"""The CLI front door: --help and --version work and never import torch."""

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    code = (
        "import sys; from duet.cli import main; sys.argv=['duet', *sys.argv[1:]];\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(code)"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


def test_version_without_torch():
    r = run("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("duet ")


def test_help_without_torch():
    r = run("--help")
    assert r.returncode == 0, r.stderr
    assert "solver" in r.stdout.lower()
