"""How fast the `duet` command starts, against the interpreter's own start, in one run.

    python benchmarks/cli_startup.py             # 15 runs of each, interleaved
    python benchmarks/cli_startup.py --runs 30 --json

baseline      `python -c pass` (the same interpreter as the console script)
duet --help   the installed console script
duet --version
import torch  `python -c "import torch"`: what `--help` would cost if it imported the runtime

Runs are interleaved (baseline, --help, --version, baseline, ...) so machine load hits all alike;
medians are reported with the ratio to the baseline. Target: `duet --help` within 10x of
`python -c pass` (typer + click + duet's option declarations, and no torch).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_RATIO = 10.0


def console_script() -> str:
    """The `duet` script next to this interpreter, else the one on PATH."""
    here = Path(sys.executable).with_name("duet")
    return str(here) if here.exists() else (shutil.which("duet") or "duet")


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each command (median reported)")
    parser.add_argument("--torch", action="store_true", help="also time `import torch` for reference")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    duet = console_script()
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "duet --help": [duet, "--help"],
        "duet --version": [duet, "--version"],
    }
    if args.torch:
        commands["python -c 'import torch'"] = [sys.executable, "-c", "import torch"]
    for argv in commands.values():  # warm the page cache and .pyc files
        timed(argv)
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, argv in commands.items():
            samples[name].append(timed(argv))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    base = medians["python -c pass"]
    ratio = medians["duet --help"] / base
    if args.json:
        print(json.dumps({"runs": args.runs, "median_ms": {k: round(v * 1000, 1) for k, v in medians.items()},
                          "ratio_help_to_python": round(ratio, 2), "target_ratio": TARGET_RATIO,
                          "ok": ratio <= TARGET_RATIO}))
    else:
        print(f"{'command':<28} {'median':>9} {'vs python':>10}   ({args.runs} runs each, interleaved)")
        for name, value in medians.items():
            print(f"{name:<28} {value * 1000:>7.1f} ms {value / base:>9.1f}x")
        verdict = "ok" if ratio <= TARGET_RATIO else "SLOWER THAN TARGET"
        print(f"duet --help is {ratio:.1f}x `python -c pass` (target <= {TARGET_RATIO:g}x): {verdict}")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
