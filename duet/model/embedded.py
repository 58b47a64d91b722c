"""Where the embedded default model lives: shipped inside the package, overridable by DUET_MODEL."""

from __future__ import annotations

import os
from pathlib import Path

from duet.errors import CheckpointError

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "assets" / "model"


def default_model_path() -> Path:
    """The checkpoint `solve`, `repl`, `eval` and `bench` use when no --model is given."""
    override = os.environ.get("DUET_MODEL")
    if override:
        return Path(override).expanduser()
    if not (EMBEDDED_DIR / "config.json").is_file():
        raise CheckpointError(
            f"the embedded model is not installed at {EMBEDDED_DIR}; train it with `duet train` "
            "or pass --model DIR (or set DUET_MODEL)"
        )
    return EMBEDDED_DIR
