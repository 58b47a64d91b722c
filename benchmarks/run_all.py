"""Run the CPU benchmarks in one command (`make bench`); each prints ratios measured in the same run.

The GPU kernel benchmark (benchmarks/kernels.py) runs only where CUDA is available; `context_scaling.py`
(decode speed against context length, minutes on a CPU) runs on its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    runs = [
        [sys.executable, str(HERE / "cli_startup.py")],
        [sys.executable, str(HERE / "sandbox.py")],
        [sys.executable, str(HERE / "generation.py"), "--batch", "1", "--batch", "8", "--new-tokens", "64"],
        [sys.executable, str(HERE / "mtp_acceptance.py")],
        [sys.executable, str(HERE / "mtp_bound.py")],
        [sys.executable, str(HERE / "prefix_cache.py")],
        [sys.executable, str(HERE / "eval_throughput.py")],
    ]
    try:
        import torch

        if torch.cuda.is_available():
            runs.append([sys.executable, str(HERE / "kernels.py")])
    except ImportError:
        pass
    failed = 0
    for cmd in runs:
        print(f"\n$ {' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}", flush=True)
        failed += subprocess.call(cmd, env=env) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
