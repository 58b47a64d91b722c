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


def test_bench_checks_its_options_before_loading_anything(tmp_path):
    cases = [
        (["--batch", "0"], "Invalid value for '--batch'"),
        (["--batch", "-1"], "Invalid value for '--batch'"),
        (["--context", "0"], "Invalid value for '--context'"),
        (["--new-tokens", "0"], "Invalid value for '--new-tokens'"),
        (["--mtp-depth", "0"], "Invalid value for '--mtp-depth'"),
        (["--threads", "-1"], "Invalid value for '--threads'"),
        (["--dtype", "int8"], "Invalid value for '--dtype': 'int8' is not one of float32, bfloat16, float16"),
        (["--device", "tpu"], "--device: 'tpu' is not valid for device"),
        (["--prompts", str(tmp_path / "none.txt")], "Invalid value for '--prompts'"),
    ]
    for args, message in cases:
        r = run("bench", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_logs_limit_must_be_positive():
    """`duet logs -n 0` listed nothing and said the log was empty (QA); it is now a usage error."""
    r = run("logs", "-n", "0")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "'--limit'" in r.stderr
