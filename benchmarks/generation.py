"""Generation speed: duet's engine (with and without MTP) against transformers' generate, in one run.

    python benchmarks/generation.py [--model DIR] [--batch 1 --batch 8] [--context 1024] [--new-tokens 64]

Without --model it uses the embedded default model. Prints the `duet bench` table (ratios against
plain duet decoding measured in the same run). Set OMP_WAIT_POLICY=PASSIVE on a shared machine.
"""

from __future__ import annotations

import sys

import typer

from duet.bench import bench_command

if __name__ == "__main__":
    sys.argv = [sys.argv[0], *([a for a in sys.argv[1:]] + ([] if "--vs-transformers" in sys.argv else
                                                          ["--vs-transformers"]))]
    typer.run(bench_command)
