"""Sandbox speed, all measured in one run: warm step, session start, cold spawn, and their ratio.

    python benchmarks/sandbox.py                # strongest isolation available here
    python benchmarks/sandbox.py --isolation landlock --steps 500 --json

warm step     Sandbox.run("print(2+2)") on a live session (median over --steps)
session start a new session forked from the warm fork server, ready to run (median over --sessions)
fork server   first start in this process: bubblewrap (if used) + interpreter + importing sympy
cold spawn    subprocess `python -I -c "import sympy; print(2+2)"` (median over --cold), the
              baseline a sandbox without a fork server would pay on every step
parallel      --threads sandboxes stepping at once from threads (batch evaluation)

Target: a warm step at least 20x faster than a cold spawn.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duet.sandbox import Sandbox, chosen_isolation  # noqa: E402

TARGET_RATIO = 20.0


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _p90_ms(samples: list[float]) -> float:
    return sorted(samples)[int(0.9 * (len(samples) - 1))] * 1000


def measure(isolation: str, steps: int, sessions: int, cold: int, threads: int) -> dict:
    mode = chosen_isolation() if isolation == "auto" else isolation

    started = time.perf_counter()
    first = Sandbox(isolation=mode)
    first.start()  # starts the fork server for this mode, then one session
    server_start = time.perf_counter() - started

    for _ in range(20):  # let caches and the scheduler settle
        first.run("print(2+2)")
    warm = []
    for _ in range(steps):
        t = time.perf_counter()
        result = first.run("print(2+2)")
        warm.append(time.perf_counter() - t)
        assert result.stdout == "4\n", result
    layers = first.layers
    first.close()

    starts = []
    for _ in range(sessions):
        sb = Sandbox(isolation=mode)
        t = time.perf_counter()
        sb.start()
        starts.append(time.perf_counter() - t)
        sb.close()

    spawns = []
    for _ in range(cold):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-I", "-c", "import sympy; print(2+2)"],
                             capture_output=True, text=True, check=True).stdout
        spawns.append(time.perf_counter() - t)
        assert out == "4\n"

    per_thread = max(1, steps // threads)
    boxes = [Sandbox(isolation=mode) for _ in range(threads)]
    for sb in boxes:
        sb.start()

    def step(sb: Sandbox) -> None:
        for _ in range(per_thread):
            sb.run("print(2+2)")

    workers = [threading.Thread(target=step, args=(sb,)) for sb in boxes]
    t = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    parallel_s = time.perf_counter() - t
    for sb in boxes:
        sb.close()

    warm_ms, cold_ms = _median_ms(warm), _median_ms(spawns)
    return {
        "isolation": mode,
        "layers": list(layers),
        "warm_step_ms": round(warm_ms, 3),
        "warm_step_p90_ms": round(_p90_ms(warm), 3),
        "session_start_ms": round(_median_ms(starts), 2),
        "fork_server_start_ms": round(server_start * 1000, 1),
        "cold_spawn_ms": round(cold_ms, 1),
        "cold_over_warm": round(cold_ms / warm_ms, 1),
        "parallel_steps_per_s": round(threads * per_thread / parallel_s, 1),
        "threads": threads,
        "target_ratio": TARGET_RATIO,
        "meets_target": cold_ms / warm_ms >= TARGET_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isolation", default="auto", choices=["auto", "bwrap", "landlock", "rlimits", "none"])
    parser.add_argument("--steps", type=int, default=300, help="warm steps (median)")
    parser.add_argument("--sessions", type=int, default=30, help="session starts (median)")
    parser.add_argument("--cold", type=int, default=7, help="cold spawns (median)")
    parser.add_argument("--threads", type=int, default=16, help="sandboxes stepping in parallel")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    r = measure(args.isolation, args.steps, args.sessions, args.cold, args.threads)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"sandbox benchmark  isolation={r['isolation']}  layers={'+'.join(r['layers'])}")
        p90 = r["warm_step_p90_ms"]
        print(f"  warm step      {r['warm_step_ms']:9.3f} ms  median of {args.steps} (p90 {p90:.3f} ms)")
        print(f"  session start  {r['session_start_ms']:9.2f} ms  median of {args.sessions}")
        print(f"  fork server    {r['fork_server_start_ms']:9.1f} ms  once per process and isolation mode")
        print(f"  cold spawn     {r['cold_spawn_ms']:9.1f} ms  median of {args.cold}: python -I -c 'import sympy'")
        print(f"  cold / warm    {r['cold_over_warm']:9.1f} x   target >= {TARGET_RATIO:g}x: "
              f"{'met' if r['meets_target'] else 'NOT met'}")
        print(f"  parallel       {r['parallel_steps_per_s']:9.1f} steps/s with {r['threads']} sandboxes in threads")
    return 0 if r["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
