import os

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads make
# training several times slower whenever another process runs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402

from duet.train.cli import train_command  # noqa: E402

typer.run(train_command)
