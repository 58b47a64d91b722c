"""The challenge dev split: variations of the dev rows that the model never saw in any form.

Every problem is built by code from a MAWPS + ASDiv-A *dev* row (never a training row): the row's story
with fresh numbers, changed by one variation (duet.train.variations), with the gold answer computed from
the variation's own equation. Kinds, reported separately by `duet eval`: distractor, inverse, reorder,
surface, two_step, compare.

    python -m duet.train.challenge --data ../shared/data --out data/dev/challenge.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from duet.train.sources import Sources
from duet.train.story import infix, number_text
from duet.train.variations import VARIATIONS, vary

PER_KIND = 100  # problems per kind
PER_ROW = 3  # at most this many problems of one kind from one dev row


def challenge_rows(sources: Sources, seed: int = 0, per_kind: int = PER_KIND) -> list[dict]:
    """The challenge problems as `duet eval` rows: id, kind, question, answer (`#### N`), equation, source."""
    rows: list[dict] = []
    seen: set[str] = set()
    for kind in VARIATIONS:
        rng = random.Random(f"{seed}:{kind}")
        made = 0
        for _ in range(PER_ROW):
            order = list(sources.mawps_dev)
            rng.shuffle(order)
            for row in order:
                if made >= per_kind:
                    break
                story = vary(row.story(), kind, rng)
                if story is None:
                    continue
                question = story.question()
                if question in seen:
                    continue
                seen.add(question)
                values = {f"number{i}": number_text(v) for i, v in enumerate(story.numbers)}
                rows.append({"id": f"{kind}-{made + 1}", "kind": kind, "question": question,
                             "answer": f"#### {number_text(story.value())}",
                             "equation": infix(story.equation, values), "source": f"mawps-{row.index}"})
                made += 1
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m duet.train.challenge", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data folder")
    parser.add_argument("--out", type=Path, default=Path("data/dev/challenge.jsonl"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-kind", type=int, default=PER_KIND)
    args = parser.parse_args(argv)
    rows = challenge_rows(Sources.load(args.data), args.seed, args.per_kind)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(args.out)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    print(f"wrote {len(rows)} problems to {args.out}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
