"""The engine's prefix cache on a dialogue workload: wall time and time to first token with the cache on and off.

    python benchmarks/prefix_cache.py [--model DIR] [-n 16] [-j 8] [--repeats 2] [--json]

Each of the first N MAWPS + ASDiv-A dev questions runs a solver + critic dialogue shaped like duet's (greedy):
the solver's first turn (its system prompt and the question, up to the first ```output stop), the solver's
continuation after the code output (the whole conversation again plus the output), a critic turn (the critic's
system prompt, the question and the solution) and a revision (the solver's conversation plus the critique).
J dialogues run at once from threads, as in `duet eval -j J`, their requests decoded together by one engine.

A second workload has no shared prefix at all (each prompt starts with its own random text, no chat template):
what the cache costs when it cannot help.

Both workloads run with the prefix cache off and on (emptied first), round-robin, `--repeats` times, on one
loaded model; the figures are medians and the ratios come from the same run. Every turn's tokens are
compared between the two settings (greedy: they must be equal).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import typer

DEV = Path(__file__).resolve().parents[1] / "data" / "dev" / "mawps_asdiv_a_dev.jsonl"


def dialogue(engine, prompts, question: str, stop: str) -> list:
    """One solver + critic dialogue; returns its four GenerationResults."""
    from duet.engine import SamplingParams

    def turn(messages, max_new, stops=()):
        return engine.submit(engine.encode_chat(messages), SamplingParams(max_new_tokens=max_new, stop=list(stops)))

    solver = [{"role": "system", "content": prompts.solver_system},
              {"role": "user", "content": prompts.solver_question(question)}]
    first = turn(solver, 96, [stop])
    partial = first.text + f"{stop}\n47\n```\n"
    second = turn(solver + [{"role": "assistant", "content": partial}], 64, [stop])
    solution = partial + second.text
    critic = turn([{"role": "system", "content": prompts.critic_system},
                   {"role": "user", "content": prompts.critic_request(question, solution)}], 32)
    revision = turn(solver + [{"role": "assistant", "content": solution},
                              {"role": "user", "content": prompts.revise_request(critic.text)}], 48, [stop])
    return [first, second, critic, revision]


def unshared(engine, question: str, seed: int) -> list:
    """One request whose prompt shares nothing with the others (random leading words, no template)."""
    from duet.engine import SamplingParams

    rng = random.Random(seed)
    words = " ".join(rng.choice(["apple", "train", "box", "coin", "river", "seven", "blue", "count"])
                     for _ in range(40))
    return [engine.submit(engine.encode(f"{seed} {words}\n{question}\n"), SamplingParams(max_new_tokens=48))]


def run(engine, jobs: list, j: int) -> tuple[float, list[list]]:
    start = time.perf_counter()
    with ThreadPoolExecutor(j) as pool:
        results = list(pool.map(lambda job: job(), jobs))
    return time.perf_counter() - start, results


def main(model: Path | None = typer.Option(None, "--model", help="Checkpoint (default: the embedded model)."),
         n: int = typer.Option(16, "-n", help="Dialogues (questions)."),
         j: int = typer.Option(8, "-j", help="Dialogues at once (and the engine's batch)."),
         repeats: int = typer.Option(2, "--repeats", min=1, help="Round-robin rounds (medians reported)."),
         as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON.")) -> None:
    from duet.agents.protocol import STOP
    from duet.engine import Engine
    from duet.model.embedded import default_model_path
    from duet.prompts import load_prompts

    prompts = load_prompts()
    engine = Engine.load(model or default_model_path(), max_batch=j).start()
    questions = [json.loads(line)["question"] for line in DEV.read_text().splitlines()[:n]]
    workloads = {
        "dialogues": [lambda q=q: dialogue(engine, prompts, q, STOP) for q in questions],
        "no shared prefix": [lambda q=q, i=i: unshared(engine, q, i) for i, q in enumerate(questions)],
    }
    run(engine, workloads["dialogues"][:2], 2)  # warm-up
    measured: dict[tuple[str, bool], list[dict]] = {}
    outputs: dict[tuple[str, bool], list] = {}
    for _ in range(repeats):
        for name, jobs in workloads.items():
            for on in (False, True):
                engine.set_prefix_cache(on, clear=True)
                before = engine.prefix_cache_stats()
                seconds, results = run(engine, jobs, j)
                after = engine.prefix_cache_stats()
                flat = [r for d in results for r in d]
                later = [r for d in results for r in d[1:2] + d[3:4]]  # continuation and revision turns
                measured.setdefault((name, on), []).append({
                    "seconds": seconds,
                    "prompt_tokens": sum(r.prompt_tokens for r in flat),
                    "reused_tokens": sum(r.cached_tokens for r in flat),
                    "completion_tokens": sum(r.completion_tokens for r in flat),
                    "ttft_later_turns": statistics.mean(r.first_token_seconds for r in later) if later else None,
                    "hit_rate": (after["reused_tokens"] - before["reused_tokens"])
                    / max(1, after["prompt_tokens"] - before["prompt_tokens"]),
                    "held_mib": after["held_bytes"] / 2**20,
                })
                outputs[(name, on)] = [[r.token_ids for r in d] for d in results]
    engine.set_prefix_cache(True)

    def median(name: str, on: bool, key: str):
        values = [m[key] for m in measured[(name, on)] if m[key] is not None]
        return statistics.median(values) if values else None

    report = {"model": str(model or default_model_path()), "dialogues": n, "concurrency": j, "repeats": repeats,
              "workloads": {}}
    for name in workloads:
        off_s, on_s = median(name, False, "seconds"), median(name, True, "seconds")
        entry = {"seconds_off": round(off_s, 2), "seconds_on": round(on_s, 2),
                 "speedup": round(off_s / on_s, 3),
                 "prompt_tokens": int(median(name, True, "prompt_tokens")),
                 "reused_tokens": int(median(name, True, "reused_tokens")),
                 "completion_tokens": int(median(name, True, "completion_tokens")),
                 "hit_rate": round(median(name, True, "hit_rate"), 4),
                 "held_mib": round(median(name, True, "held_mib"), 2),
                 "same_tokens": outputs[(name, False)] == outputs[(name, True)]}
        t_off, t_on = median(name, False, "ttft_later_turns"), median(name, True, "ttft_later_turns")
        if t_off and t_on:
            entry.update(ttft_later_off_ms=round(1000 * t_off, 1), ttft_later_on_ms=round(1000 * t_on, 1),
                         ttft_later_speedup=round(t_off / t_on, 2))
        report["workloads"][name] = entry
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(f"prefix cache: {n} dialogues, {j} at once, medians of {repeats} round-robin runs "
          f"({report['model']})")
    for name, e in report["workloads"].items():
        line = (f"  {name:17s} off {e['seconds_off']:6.2f} s  on {e['seconds_on']:6.2f} s  "
                f"wall-time speed-up {e['speedup']:.2f}x  hit rate {e['hit_rate']:.1%} "
                f"({e['reused_tokens']:,} of {e['prompt_tokens']:,} prompt tokens reused, "
                f"{e['completion_tokens']:,} generated)  held {e['held_mib']:.1f} MiB")
        if "ttft_later_speedup" in e:
            line += (f"\n  {'':17s} time to first token of later turns: off {e['ttft_later_off_ms']:.0f} ms, "
                     f"on {e['ttft_later_on_ms']:.0f} ms ({e['ttft_later_speedup']:.2f}x)")
        if not e["same_tokens"]:
            line += "\n  !! the generated tokens differ with the cache on"
        print(line)


if __name__ == "__main__":
    typer.run(main)
