"""The most MTP speculative decoding can gain on this machine and model: an upper bound from forward costs.

    python benchmarks/mtp_bound.py [--model DIR] [--context 300] [--tokens1 1.89] [--tokens2 2.41]

A depth-1 speculative step is one main-model pass over 2 tokens (the last token and the draft) plus
one MTP-module pass over them; it yields `tokens1` tokens on average (1 + acceptance). Plain decoding
yields 1 token per 1-token pass. So, with no other overhead at all (acceptance logic, sampling,
Python), the speed-up is at most

    tokens1 * t_main(1) / (t_main(2) + t_mtp(2))

and at depth 2 (a 3-token pass, the MTP module over 3 tokens, then once more over 1 for the second
draft) tokens2 * t_main(1) / (t_main(3) + t_mtp(3) + t_mtp(1)). The default tokens per step are the
embedded model's on real solver turns (`benchmarks/mtp_acceptance.py`). Times the model's eager
forward passes (logits included) over a cache of `--context` positions, in one process. Where the bound is under
the 1.6x of the engine issue, no engineering of the speculative loop reaches it on this hardware.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer


def main(model: Path | None = typer.Option(None, "--model", help="Checkpoint (default: the embedded model)."),
         context: int = typer.Option(300, "--context", help="Cached positions before the new tokens."),
         tokens1: float = typer.Option(1.89, "--tokens1", help="Tokens per depth-1 speculative step."),
         tokens2: float = typer.Option(2.41, "--tokens2", help="Tokens per depth-2 speculative step."),
         repeats: int = typer.Option(200, "--repeats", help="Timed calls per measurement."),
         threads: int = typer.Option(1, "--threads", help="torch threads (the engine uses 1 on a CPU).")) -> None:
    import torch

    from duet.model import CacheView, KVCache, load_model
    from duet.model.embedded import default_model_path

    torch.set_num_threads(threads)
    m = load_model(model or default_model_path(), device="cpu", dtype=torch.float32)
    cache = KVCache(m.args, m.n_cache_layers, 1, context + 16)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        prefix = torch.randint(3, m.args.vocab_size, (1, context), generator=g)
        m.hidden(prefix, CacheView(cache, slice(0, 1), torch.tensor([0]), fresh=True))

        def timed(fn) -> float:
            for _ in range(10):
                fn()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            return (time.perf_counter() - start) / repeats * 1e3

        def view() -> CacheView:
            return CacheView(cache, slice(0, 1), torch.tensor([context]))

        main_ms, mtp_ms = {}, {}
        for s in (1, 2, 3):
            ids = torch.randint(3, m.args.vocab_size, (1, s), generator=g)
            h = torch.randn(1, s, m.args.hidden_size, generator=g)
            main_ms[s] = timed(lambda ids=ids: m.logits(m.hidden(ids, view())))
            mtp_ms[s] = timed(lambda ids=ids, h=h: m.mtp_logits(0, h, ids, view()))
    print(f"eager forward passes, {context} cached positions, {threads} thread(s), ms per call:")
    for s in (1, 2, 3):
        print(f"  main model, {s} token(s): {main_ms[s]:.2f}   MTP module, {s} token(s): {mtp_ms[s]:.2f}")
    depth1 = tokens1 * main_ms[1] / (main_ms[2] + mtp_ms[2])
    depth2 = tokens2 * main_ms[1] / (main_ms[3] + mtp_ms[3] + mtp_ms[1])
    print(f"2-token pass / 1-token pass: {main_ms[2] / main_ms[1]:.2f}x; MTP pass / main pass: "
          f"{mtp_ms[2] / main_ms[1]:.2f}")
    print(f"upper bound on the MTP speed-up: depth 1 {depth1:.2f}x ({tokens1:.2f} tokens per step), "
          f"depth 2 {depth2:.2f}x ({tokens2:.2f})")


if __name__ == "__main__":
    typer.run(main)
