r"""On-policy critic data: the model's own solutions to training problems, right and wrong.

The synthetic wrong solutions in `duet.train.solutions` (another operation, swapped numbers) are not the
mistakes the model makes, so a critic trained only on them learns to agree with the model's real
mistakes. This module collects real ones in three steps, reusing `duet eval` for the generation:

    python -m duet.train.onpolicy problems --data ../shared/data --out runs/onpolicy/problems.jsonl
    duet eval run runs/onpolicy/problems.jsonl --modes solver-only -j 16 --out runs/onpolicy/eval
    python -m duet.train.onpolicy build runs/onpolicy/problems.jsonl runs/onpolicy/eval \
        --out data/training/onpolicy.jsonl

`problems` writes the MAWPS + ASDiv-A *training* rows (never the dev split) with their original
numbers, and with `--varied N` also N variations of training rows (the challenge split's kinds, fresh
numbers), as an eval dataset that also carries each problem's reference solution cells. `build` joins
them with every solver turn the model wrote for each (one in solver-only; the greedy one and k samples
in `verifier@k`, whose `--sample-temperature` sets how varied they are), and whether its answer was
right. `duet train --onpolicy FILE` then draws them (weight `onpolicy` in `--mix`): the verifier learns
to judge the model's own solutions (all wrong ones, about a third of the right ones, so that the classes
stay near balance), the critic to agree with its right solutions and to disagree with its wrong ones
(recomputing the answer from the reference cells), and the solver to revise a rejected solution into
the reference one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from duet.answers import equivalent
from duet.errors import DuetError
from duet.train.cli import DATA_FILES, unusable_out
from duet.train.sources import Sources, mawps_problem, story_problem
from duet.train.variations import VARIATIONS, vary


def problem_records(sources: Sources, varied: int = 0, seed: int = 0) -> list[dict]:
    """The MAWPS training rows with their original numbers, then ``varied`` variations of training rows
    (duet.train.variations, fresh numbers), in `duet eval` JSONL form plus `cells` and `kind`."""
    records = []
    for row in sources.mawps_train:
        p = mawps_problem(row, None)
        if p is not None:
            records.append({"id": p.id, "question": p.question, "answer": f"#### {p.gold}", "cells": p.cells})
    rng = random.Random(seed)
    kinds = list(VARIATIONS)
    while varied > 0:
        kind = kinds[varied % len(kinds)]
        story = vary(rng.choice(sources.mawps_train).story(), kind, rng)
        p = story_problem(story, rng, "variations") if story else None
        if p is not None:
            records.append({"id": f"varied-{varied}", "kind": kind, "question": p.question,
                            "answer": f"#### {p.gold}", "cells": p.cells})
            varied -= 1
    return records


SAMPLING_MODES = ("solver-only", "self-consistency@", "verifier@")


def join_attempts(problems: Path, eval_dir: Path) -> tuple[list[dict], dict[str, int]]:
    """The problems joined with the solver turn of every solution of each result (one for solver-only, k for
    self-consistency@k, k + 1 for verifier@k), in dataset order: (attempts, counts)."""
    rows = [json.loads(line) for line in problems.read_text().splitlines()]
    counts = {"correct": 0, "wrong": 0, "no_answer": 0, "skipped": 0}
    attempts = []
    results = [json.loads(line) for line in (eval_dir / "results.jsonl").read_text().splitlines()]
    # in dataset order: the eval records results as problems finish, which varies from run to run
    for result in sorted(results, key=lambda r: r.get("line", 0)):
        # eval records name the dataset line they came from; the question must match it
        row = rows[result["line"] - 1] if 0 < result.get("line", 0) <= len(rows) else None
        if (not result["mode"].startswith(SAMPLING_MODES) or row is None or row["question"] != result["question"]
                or not result.get("transcript")):
            counts["skipped"] += 1
            continue
        for dialogue in json.loads((eval_dir / result["transcript"]).read_text())["dialogues"]:
            turn = next((t for t in dialogue["turns"] if t["agent"] == "solver"), None)
            if turn is None or not turn["text"].strip():
                counts["skipped"] += 1
                continue
            right = turn.get("answer") is not None and equivalent(turn["answer"], result["gold"])
            kind = "no_answer" if turn.get("answer") is None else "correct" if right else "wrong"
            counts[kind] += 1
            attempts.append({"id": row["id"], "question": row["question"], "cells": row["cells"],
                             "solution": turn["text"], "answer": turn.get("answer"), "correct": right})
    return attempts, counts


def write_jsonl(out: Path, records: list[dict]) -> None:
    """Write `out` whole or not at all: a temporary file beside it, renamed over it when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m duet.train.onpolicy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("problems", help="write the MAWPS training rows as an eval dataset with reference cells")
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--varied", type=int, default=0, metavar="N",
                   help="also N variations of training rows (each kind in turn, fresh numbers)")
    b = sub.add_parser("build", help="join the problems with a `duet eval` run (solver-only, self-consistency@k "
                                     "or verifier@k)")
    b.add_argument("problems", type=Path)
    b.add_argument("eval_dir", type=Path)
    b.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    def fail(message: str, code: int = 2) -> None:
        parser.exit(code, f"error: {message}\n")  # one line: no usage text for a wrong file

    if (problem := unusable_out(args.out, directory=False)):
        fail(f"--out {problem}")
    if args.command == "problems":
        for name in DATA_FILES:
            if not (args.data / name).is_file():
                fail(f"{args.data} has no {name}; pass --data DIR")
        try:
            records = problem_records(Sources.load(args.data), args.varied)
        except DuetError as e:
            fail(str(e), 1)
        summary = f"{len(records)} problems"
    else:
        if not (args.eval_dir / "results.jsonl").is_file():
            fail(f"{args.eval_dir} has no results.jsonl; run `duet eval run` first")
        try:
            records, counts = join_attempts(args.problems, args.eval_dir)
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:  # not what eval writes
            fail(f"cannot join {args.problems} with {args.eval_dir} ({type(e).__name__}: {e}); "
                 "pass the problems file that the eval ran on")
        if not records:
            fail(f"cannot join {args.problems} with {args.eval_dir} (no result matches a problem); "
                 "pass the problems file that the eval ran on")
        summary = str(counts)
    try:
        write_jsonl(args.out, records)
    except OSError as e:
        fail(f"--out {args.out}: {e.strerror or e}", 1)
    print(f"{summary} -> {args.out}")


if __name__ == "__main__":
    main()
