"""`python -m duet.train ARGS`: the same as `duet train ARGS`, with its one-line errors."""

import sys

from duet.cli import main  # sets OMP_WAIT_POLICY=PASSIVE before torch loads, like `duet train`

main(["train", *sys.argv[1:]])
