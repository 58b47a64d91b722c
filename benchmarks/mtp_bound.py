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

It also prints a bound that holds on any hardware: the weights one token's pass reads (routed experts
counted at top-k of E), for the MTP module as a fraction f of the main model's. Even if verifying k+1
tokens cost no more than one token, a depth-1 step costs at least 1 + f main passes in a memory-bound
decode, so the speed-up is at most tokens1 / (1 + f), and 2 / (1 + f) at 100% acceptance.
DeepSeek-V3's f, from its config on the meta device, is printed beside it for scale.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import typer

from duet.model.plan import activated_parameters as weights_read  # (main, MTP module 0), per token


def deepseek_v3_mtp_share() -> float:
    """f for DeepSeek-V3 (671B), built from its default arguments on the meta device (no memory)."""
    import torch

    from duet.model import Transformer
    from duet.model.config import ModelArgs

    with torch.device("meta"):
        main, mtp = weights_read(Transformer(ModelArgs(), n_mtp=1))
    return mtp / main


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

        def view() -> CacheView:
            return CacheView(cache, slice(0, 1), torch.tensor([context]))

        calls = {}
        for s in (1, 2, 3):
            ids = torch.randint(3, m.args.vocab_size, (1, s), generator=g)
            h = torch.randn(1, s, m.args.hidden_size, generator=g)
            calls["main", s] = lambda ids=ids: m.logits(m.hidden(ids, view()))
            calls["mtp", s] = lambda ids=ids, h=h: m.mtp_logits(0, h, ids, view())
        # Round-robin over the six passes, median per pass: a shared machine's slow spells then hit them
        # all alike instead of whichever was being timed.
        times: dict = {key: [] for key in calls}
        for rep in range(repeats + 10):
            for key, fn in calls.items():
                start = time.perf_counter()
                fn()
                if rep >= 10:  # warm-up
                    times[key].append(time.perf_counter() - start)
        ms = {key: statistics.median(t) * 1e3 for key, t in times.items()}
        main_ms = {s: ms["main", s] for s in (1, 2, 3)}
        mtp_ms = {s: ms["mtp", s] for s in (1, 2, 3)}
    print(f"eager forward passes, {context} cached positions, {threads} thread(s), median ms per call:")
    for s in (1, 2, 3):
        print(f"  main model, {s} token(s): {main_ms[s]:.2f}   MTP module, {s} token(s): {mtp_ms[s]:.2f}")
    depth1 = tokens1 * main_ms[1] / (main_ms[2] + mtp_ms[2])
    depth2 = tokens2 * main_ms[1] / (main_ms[3] + mtp_ms[3] + mtp_ms[1])
    print(f"2-token pass / 1-token pass: {main_ms[2] / main_ms[1]:.2f}x; MTP pass / main pass: "
          f"{mtp_ms[2] / main_ms[1]:.2f}")
    print(f"upper bound on the MTP speed-up: depth 1 {depth1:.2f}x ({tokens1:.2f} tokens per step), "
          f"depth 2 {depth2:.2f}x ({tokens2:.2f})")
    main_read, mtp_read = weights_read(m)
    f = mtp_read / main_read
    print(f"weights read per token: main model {main_read / 1e6:.2f}M, MTP module {mtp_read / 1e6:.2f}M, "
          f"f = {f:.3f} of a main pass (DeepSeek-V3: {deepseek_v3_mtp_share():.3f})")
    print(f"bound with verification free, any memory-bound hardware: depth 1 {tokens1 / (1 + f):.2f}x "
          f"({tokens1:.2f} tokens per step), {2 / (1 + f):.2f}x at 100% acceptance")


if __name__ == "__main__":
    typer.run(main)
