"""What batching buys `duet eval`: problems per minute with `-j 16` against `-j 1`, solver-only and with the critic,
and what the critic costs: its problems per minute against solver-only's at the same `-j`.

    python benchmarks/eval_throughput.py [--model DIR] [-n 48] [-j 16] [--repeats 1] [--json]

Each configuration is a real `duet eval` run (a child process, the embedded model unless --model) on the first
N MAWPS + ASDiv-A dev problems; problems per minute come from its summary (wall time from the first problem's
start to the last one's end, so loading the model is not counted), with its prompt tokens and the prefix
cache's share of them. The configurations run round-robin, `--repeats` times; the figures are medians and the
ratios (`-j J` over `-j 1` per mode, and with the critic over solver-only per `-j`) come from the same run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import typer

DEV = Path(__file__).resolve().parents[1] / "data" / "dev" / "mawps_asdiv_a_dev.jsonl"
MODES = ("solver-only", "solver+critic")


def run_eval(model: Path | None, data: Path, n: int, mode: str, jobs: int) -> dict:
    """One `duet eval` run -> {problems_per_minute, accuracy, prompt_tokens, reused_share}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        argv = [sys.executable, "-m", "duet", "eval", str(data), "--limit", str(n), "--modes", mode,
                "-j", str(jobs), "--out", str(out), "--no-progress"]
        if model is not None:
            argv += ["--model", str(model)]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"duet eval failed ({' '.join(argv[2:])}): {done.stderr.strip()[-400:]}")
        summary = json.loads((out / "summary.json").read_text())
    figures = summary["modes"][mode]
    cache = (summary.get("prefix_cache") or {}).get("solver") or {}
    return {"problems_per_minute": figures["problems_per_minute"], "accuracy": figures["accuracy"],
            "prompt_tokens": figures["prompt_tokens"], "reused_share": cache.get("hit_rate")}


def main(model: Path = typer.Option(None, help="A checkpoint directory (default: the embedded model)."),
         n: int = typer.Option(48, "-n", help="Dev problems per run."),
         jobs: int = typer.Option(16, "-j", help="The concurrency compared with -j 1."),
         repeats: int = typer.Option(1, help="Round-robin repeats; medians are reported."),
         data: Path = typer.Option(DEV, help="The problems (a duet eval dataset)."),
         as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    configs = [(mode, j) for mode in MODES for j in (1, jobs)]
    measured: dict[tuple[str, int], list[dict]] = {c: [] for c in configs}
    for _ in range(repeats):
        for mode, j in configs:
            measured[(mode, j)].append(run_eval(model, data, n, mode, j))
    rows = []
    for mode, j in configs:
        runs = measured[(mode, j)]
        ppm = statistics.median(r["problems_per_minute"] for r in runs)
        base = statistics.median(r["problems_per_minute"] for r in measured[(mode, 1)])
        solo = statistics.median(r["problems_per_minute"] for r in measured[(MODES[0], j)])
        rows.append({"mode": mode, "jobs": j, "problems_per_minute": ppm, "vs_j1": ppm / base,
                     "vs_solver_only": ppm / solo,
                     "accuracy": runs[0]["accuracy"], "prompt_tokens": runs[0]["prompt_tokens"],
                     "reused_share": runs[0]["reused_share"]})
    if as_json:
        print(json.dumps({"n": n, "repeats": repeats, "rows": rows}, indent=2))
        return
    print(f"duet eval on {n} dev problems, medians of {repeats}")
    print(f"{'mode':<15}{'-j':>4}{'problems/min':>14}{'vs -j 1':>9}{'vs solver':>11}{'accuracy':>10}"
          f"{'prompt tok':>12}{'reused':>8}")
    for r in rows:
        reused = f"{r['reused_share']:.0%}" if r["reused_share"] is not None else "-"
        print(f"{r['mode']:<15}{r['jobs']:>4}{r['problems_per_minute']:>14.1f}{r['vs_j1']:>8.2f}x"
              f"{r['vs_solver_only']:>10.0%}{r['accuracy']:>10.1%}{r['prompt_tokens']:>12,}{reused:>8}")


if __name__ == "__main__":
    typer.run(main)
