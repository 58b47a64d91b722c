"""`duet bench`: generation speed of duet's engine, with and without MTP (and compiled), and of transformers'
`generate`.

Everything is measured in one run on the same checkpoint and thread count, so the ratios hold on a
noisy shared machine. Greedy decoding, EOS ignored, so every configuration generates the same number
of tokens. With ``--repeats N`` the configurations are measured round-robin N times (duet, duet + MTP,
compiled, transformers, then again) and each figure is the median of its N measurements: a slow spell of
the machine then hits every configuration alike instead of whichever was being timed.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import typer

DEFAULT_PROMPTS = [
    "A baker has 23 loaves and bakes 4 trays of 12 more. How many loaves does he have?",
    "Sam has 45 stickers and gives 17 to a friend. How many are left?",
    "A train travels at 60 km per hour for 3 hours. How far does it travel?",
    "There are 8 boxes with 15 apples in each box. How many apples are there?",
]


DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Row:
    """One measured configuration."""

    name: str
    batch: int
    context: int
    prefill_tok_s: float | None
    decode_tok_s: float
    acceptance: float | None = None
    tokens_per_forward: float | None = None
    prefix_hit_rate: float | None = None  # prompt tokens the prefix cache supplied (None: measured without it)


def _now() -> float:
    return time.perf_counter()


def measure_engine(engine, prompts: list[list[int]], new_tokens: int, mtp_depth: int, name: str,
                   prefix_cache: bool = False) -> Row:
    """Prefill: prompt tokens over the time until the last row's first token. Decode: the remaining
    tokens over the time from then until the last row finished (all rows are admitted at once).

    Without `prefix_cache` every prompt token is computed (the prefix cache off). With it, the cache is
    emptied, the prompts run once (a first turn), and the timed run asks for them again (a later turn): its
    prefill is what the cache leaves to compute."""
    from duet.engine import SamplingParams

    engine.set_mtp_depth(mtp_depth)
    engine.set_prefix_cache(prefix_cache, clear=True)
    params = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False)
    warm = prompts if prefix_cache else prompts[:1]
    engine.generate(warm, SamplingParams(max_new_tokens=4, stop_at_eos=False))  # warm-up
    before = engine.prefix_cache_stats() or {}
    results = engine.generate(prompts, params)
    engine.set_prefix_cache(True)
    prefill = max(r.first_token_seconds for r in results)
    decode = max(r.seconds for r in results) - prefill
    decoded = sum(r.completion_tokens - 1 for r in results)
    drafted = sum(r.drafted for r in results)
    forwards = sum(r.forward_passes for r in results)
    hit_rate = None
    if prefix_cache:
        after = engine.prefix_cache_stats() or {}
        looked_up = after.get("prompt_tokens", 0) - before.get("prompt_tokens", 0)
        hit_rate = (after.get("reused_tokens", 0) - before.get("reused_tokens", 0)) / looked_up if looked_up else 0.0
    return Row(name, len(prompts), len(prompts[0]), sum(map(len, prompts)) / prefill, decoded / max(decode, 1e-9),
               acceptance=sum(r.accepted for r in results) / drafted if drafted else None,
               tokens_per_forward=sum(r.completion_tokens for r in results) / forwards if forwards else None,
               prefix_hit_rate=hit_rate)


def load_transformers(path: Path, dtype):
    """transformers' DeepseekV3ForCausalLM on the same checkpoint (its MTP weights are dropped)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def measure_transformers(model, prompts: list[list[int]], new_tokens: int) -> Row:
    """transformers' `generate` (greedy, exactly new_tokens per prompt) with the model of `load_transformers`."""
    import torch

    ids = torch.tensor(prompts)
    kwargs = {"do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        model.generate(ids[:1], max_new_tokens=2, **kwargs)  # warm-up
        t0 = _now()
        model.generate(ids, max_new_tokens=1, **kwargs)
        prefill = _now() - t0
        t0 = _now()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = _now() - t0
    return Row("transformers generate", len(prompts), len(prompts[0]), ids.numel() / prefill,
               len(prompts) * (new_tokens - 1) / max(total - prefill, 1e-9))


def _median_row(measured: list[Row]) -> Row:
    """One configuration's repeated measurements -> their median figures (one Row, as measured once)."""
    def median(values: list) -> float | None:
        return None if values[0] is None else statistics.median(values)

    first = measured[0]
    return Row(first.name, first.batch, first.context, median([r.prefill_tok_s for r in measured]),
               median([r.decode_tok_s for r in measured]), median([r.acceptance for r in measured]),
               median([r.tokens_per_forward for r in measured]), median([r.prefix_hit_rate for r in measured]))


def _prompts(engine, texts: list[str], batch: int, context: int | None) -> list[list[int]]:
    """`batch` prompts of equal length: the chat prompts, or filler text cut to `context` tokens."""
    encoded = [engine.encode_chat([{"role": "user", "content": t}]) for t in texts]
    if context:
        filler = engine.encode(" ".join(texts) + " ")
        encoded = [(e + filler * (context // max(1, len(filler)) + 1))[:context] for e in encoded]
    n = min(map(len, encoded))
    return [encoded[i % len(encoded)][:n] for i in range(batch)]


def run_bench(model_path: Path, batches: list[int], contexts: list[int | None], new_tokens: int,
              vs_transformers: bool, device: str, dtype_name: str, prompts: list[str],
              mtp_depths: tuple[int, ...] = (1,), threads: int | None = None, compile: bool = False,
              repeats: int = 1, prefix_cache: bool = False) -> dict:
    import torch

    from duet.engine import Engine, SamplingParams
    from duet.model.parallel import World  # under torchrun: the ranks the model is split over

    dtype = getattr(torch, dtype_name)
    engine = Engine.load(model_path, device=device, dtype=dtype, max_batch=max(batches), threads=threads)
    if engine.threads:  # transformers runs in this thread: give it the engine's thread count
        torch.set_num_threads(engine.threads)
    compiled, compile_s = None, None
    if compile:  # the same model, decode steps through torch.compile; compiled before anything is timed
        compiled = Engine(engine.model, engine.tokenizer, max_batch=max(batches), threads=threads, compile=True)
        t0 = _now()
        for depth in (0, *mtp_depths):
            compiled.set_mtp_depth(depth)
            for n in sorted({1, min(2, max(batches)), max(batches)}):  # one row, a few, and the most
                # as long as a timed run: the first graphs may be specialised to the first cache length
                compiled.generate(_prompts(engine, prompts, n, None),
                                  SamplingParams(max_new_tokens=new_tokens + 4, stop_at_eos=False))
        compile_s = _now() - t0
    hf_model = load_transformers(model_path, dtype) if vs_transformers else None
    depths = mtp_depths if len(engine.model.mtp) else ()
    rows = []
    for context in contexts:
        for batch in batches:
            p = _prompts(engine, prompts, batch, context)
            configs: list[Callable[[], Row]] = [lambda p=p: measure_engine(engine, p, new_tokens, 0, "duet")]
            configs += [lambda p=p, d=d: measure_engine(engine, p, new_tokens, d, "duet + MTP" if d == 1
                                                        else f"duet + MTP depth {d}") for d in depths]
            if prefix_cache and engine.prefix_cache is not None:  # the prompts asked again: a later turn
                configs.append(lambda p=p: measure_engine(engine, p, new_tokens, 0, "duet, prompts cached",
                                                          prefix_cache=True))
            if compiled is not None:
                configs.append(lambda p=p: measure_engine(compiled, p, new_tokens, 0, "duet compiled"))
                configs += [lambda p=p, d=d: measure_engine(compiled, p, new_tokens, d, "duet compiled + MTP"
                                                            + ("" if d == 1 else f" depth {d}")) for d in depths]
            if hf_model is not None:
                configs.append(lambda p=p: measure_transformers(hf_model, p, new_tokens))
            rounds = [[measure() for measure in configs] for _ in range(repeats)]  # round-robin
            rows += [_median_row(list(measured)) for measured in zip(*rounds, strict=True)]
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    report = {"model": str(model_path), "device": device, "dtype": dtype_name, "threads": torch.get_num_threads(),
              "ranks": World.current().size, "new_tokens": new_tokens, "repeats": repeats,
              "peak_memory_mb": round(peak_mb, 1), "rows": [asdict(r) for r in rows]}
    if prefix_cache:
        report["prefix_cache"] = engine.prefix_cache_stats()
    if compile_s is not None:
        report["compile_seconds"] = round(compile_s, 1)
    return report


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    repeats = report.get("repeats", 1)
    medians = f", medians of {repeats} round-robin runs" if repeats > 1 else ""
    ranks = f", {report['ranks']} ranks" if report.get("ranks", 1) > 1 else ""
    table = Table(title=f"duet bench: {report['model']} ({report['device']}, {report['dtype']}, "
                        f"{report['threads']} threads{ranks}, {report['new_tokens']} new tokens{medians})")
    for col in ("config", "batch", "context", "prefill tok/s", "decode tok/s", "vs duet", "MTP acceptance",
                "tokens/forward", "prefix hit"):
        table.add_column(col, justify="right" if col != "config" else "left")
    hf = {(r["batch"], r["context"]): r["decode_tok_s"] for r in report["rows"] if r["name"] == "transformers generate"}
    if hf:
        table.add_column("vs transformers", justify="right")
    base: dict[tuple, float] = {}
    for r in report["rows"]:
        key = (r["batch"], r["context"])
        if r["name"] == "duet":
            base[key] = r["decode_tok_s"]
        ratio = r["decode_tok_s"] / base[key] if key in base else None
        cells = [r["name"], str(r["batch"]), str(r["context"]),
                 f"{r['prefill_tok_s']:.0f}" if r["prefill_tok_s"] else "-", f"{r['decode_tok_s']:.1f}",
                 f"{ratio:.2f}x" if ratio else "-",
                 f"{r['acceptance']:.1%}" if r["acceptance"] is not None else "-",
                 f"{r['tokens_per_forward']:.2f}" if r["tokens_per_forward"] else "-",
                 f"{r['prefix_hit_rate']:.1%}" if r.get("prefix_hit_rate") is not None else "-"]
        if hf:
            cells.append(f"{r['decode_tok_s'] / hf[key]:.2f}x" if key in hf else "-")
        table.add_row(*cells)
    console = Console(width=None if sys.stdout.isatty() else 160)  # a file or pipe gets whole column names
    console.print(table)
    console.print(f"peak memory: {report['peak_memory_mb']:.0f} MB" + (" (rank 0's)" if ranks else ""))
    if report.get("prefix_cache"):
        c = report["prefix_cache"]
        console.print(f"prefix cache (the whole run): {c['hit_rate']:.1%} of {c['prompt_tokens']:,} prompt tokens "
                      f"reused, {c['hits']}/{c['requests']} requests hit, {c['held_bytes'] / 2**20:.1f} MiB held "
                      f"(budget {c['capacity_bytes'] / 2**20:.0f} MiB), {c['evicted_blocks']} blocks evicted; "
                      "rows without 'prompts cached' ran with it off")
    if "compile_seconds" in report:
        console.print(f"compiling the decode steps (every graph, before timing): {report['compile_seconds']:.0f} s")


def bench_command(
    model: Path | None = typer.Option(None, "--model", help="Checkpoint directory (default: the embedded model)."),
    batch: list[int] = typer.Option([1], "--batch", min=1, help="Batch sizes to measure (repeat the option)."),
    context: list[int] = typer.Option([], "--context", min=1,
                                      help="Prompt lengths in tokens (default: the chat prompts)."),
    new_tokens: int = typer.Option(64, "--new-tokens", min=2, help="Tokens generated per prompt (the first one "
                                   "ends the prefill, the others are timed as decoding)."),
    vs_transformers: bool = typer.Option(False, "--vs-transformers", help="Also time transformers' generate."),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda, cuda:N (mps on Apple)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    prompts_file: Path | None = typer.Option(None, "--prompts", exists=True, dir_okay=False, readable=True,
                                             help="A text file with one prompt per line."),
    mtp_depth: list[int] = typer.Option([1], "--mtp-depth", min=1, help="MTP draft depths to measure (repeat the "
                                        "option; depth > 1 chains the MTP module)."),
    threads: int = typer.Option(0, "--threads", min=0, help="torch threads for every configuration (0: the "
                                "engine's choice, 1 for a small model on a CPU)."),
    compile: bool = typer.Option(False, "--compile", help="Also time plain decoding with the decode step "
                                 "compiled by torch.compile (`Engine(compile=True)`; compiling takes a while)."),
    prefix_cache: bool = typer.Option(False, "--prefix-cache", help="Also time the prompts asked a second time "
                                      "with the prefix cache on (a dialogue's later turn; the other rows run "
                                      "without it) and show its hit rate and memory."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Measure the configurations round-robin N times and "
                                "report medians (steadier ratios on a busy machine)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Prefill and decode tokens/s with and without MTP (and transformers' generate), in one run."""
    from duet.app.backends import check_device

    if dtype not in DTYPES:
        raise typer.BadParameter(f"{dtype!r} is not one of {', '.join(DTYPES)}", param_hint="'--dtype'")
    device = check_device(device)  # a usage error naming --device (imports torch once the name is valid)
    from duet.model.embedded import default_model_path

    path = model or default_model_path()
    prompts = DEFAULT_PROMPTS
    if prompts_file:
        try:
            prompts = [line for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise typer.BadParameter(f"cannot read {prompts_file}: {getattr(error, 'strerror', None) or error}",
                                     param_hint="'--prompts'") from None
        if not prompts:
            raise typer.BadParameter(f"{prompts_file} has no prompts", param_hint="'--prompts'")
    report = run_bench(path, sorted(set(batch)), list(context) or [None], new_tokens, vs_transformers, device,
                       dtype, prompts, mtp_depths=tuple(sorted(set(mtp_depth))), threads=threads or None,
                       compile=compile, repeats=repeats, prefix_cache=prefix_cache)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_table(report)
