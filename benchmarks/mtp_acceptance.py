"""MTP acceptance and speed on real solver turns, not on `duet bench`'s EOS-ignoring text.

    python benchmarks/mtp_acceptance.py [--model DIR] [-n 40] [--depth 1 --depth 2 ...]

Each of the first N MAWPS + ASDiv-A dev questions gets the solver's system prompt and is decoded
greedily until the first ```output stop (one solver step, as in a live dialogue), once without MTP
and once per MTP draft depth (default 1, 2, 3), in the same run. Prints tokens/s of each, the MTP
acceptance, tokens per forward pass, and the speed-up over plain decoding.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

DEV = Path(__file__).resolve().parents[1] / "data" / "dev" / "mawps_asdiv_a_dev.jsonl"


def main(model: Path | None = typer.Option(None, "--model", help="Checkpoint (default: the embedded model)."),
         n: int = typer.Option(40, "-n", help="Questions."),
         depth: list[int] = typer.Option([1, 2, 3], "--depth", help="MTP draft depths to compare with plain "
                                         "decoding (repeat the option).")) -> None:
    from duet.agents.protocol import STOP
    from duet.engine import Engine, SamplingParams
    from duet.model.embedded import default_model_path
    from duet.prompts import load_prompts

    prompts = load_prompts()
    engine = Engine.load(model or default_model_path()).start()
    questions = [json.loads(line)["question"] for line in DEV.read_text().splitlines()[:n]]
    chats = [engine.encode_chat([{"role": "system", "content": prompts.solver_system},
                                 {"role": "user", "content": prompts.solver_question(q)}]) for q in questions]
    speed = {}
    for d in [0, *depth]:
        engine.set_mtp_depth(d)
        start = time.perf_counter()
        results = [engine.generate([c], SamplingParams(max_new_tokens=200, stop=[STOP]))[0] for c in chats]
        tokens = sum(r.completion_tokens for r in results)
        speed[d] = tokens / (time.perf_counter() - start)
        drafted = sum(r.drafted for r in results)
        line = f"{f'MTP depth {d}' if d else 'plain      '}: {tokens} tokens, {speed[d]:.1f} tok/s"
        if drafted:
            line += (f", acceptance {sum(r.accepted for r in results) / drafted:.1%}, "
                     f"{tokens / sum(r.forward_passes for r in results):.2f} tokens per forward, "
                     f"{speed[d] / speed[0]:.2f}x plain")
        print(line)


if __name__ == "__main__":
    typer.run(main)
