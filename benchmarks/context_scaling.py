"""Decode speed against context length and batch size, on the embedded model's architecture.

    python benchmarks/context_scaling.py [--context 128 --context 1024 --context 4096] [--batch 1 --batch 8
                                          --batch 32] [--new-tokens 32] [--threads N]

The embedded model's context is 2,048 tokens, so this builds a model of exactly its architecture and
tokenizer with an 8,192-token context and random weights (speed does not depend on the weights;
MTP acceptance does, so it is not reported here: `duet bench` measures it on the trained model).
Every row is duet's plain decoding; the ratio column is against the shortest context at the same
batch size, measured in the same run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import typer

from duet.bench import run_bench


def long_context_copy(out: Path, max_positions: int) -> Path:
    """The embedded model's config and tokenizer with a longer context and random weights, saved to `out`."""
    import torch

    from duet.model import ModelArgs, Transformer, save_model
    from duet.model.embedded import default_model_path

    source = default_model_path()
    config = json.loads((source / "config.json").read_text())
    config["max_position_embeddings"] = max_positions
    args = ModelArgs.from_hf_config(config)
    model = Transformer(args).init_weights(std=0.02, generator=torch.Generator().manual_seed(0)).eval()
    save_model(model, out)
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, out / f.name)
    return out


def main(
    context: list[int] = typer.Option([128, 1024, 4096], "--context", help="Prompt lengths in tokens."),
    batch: list[int] = typer.Option([1, 8, 32], "--batch", help="Batch sizes."),
    new_tokens: int = typer.Option(32, "--new-tokens"),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: the engine's choice)."),
) -> None:
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory() as tmp:
        path = long_context_copy(Path(tmp), max(8192, max(context) + new_tokens + 8))
        report = run_bench(path, sorted(set(batch)), sorted(set(context)), new_tokens, False, "cpu", "float32",
                           ["Tell me a long story about numbers."], mtp_depths=(),
                           threads=threads or None)
    rows = [r for r in report["rows"] if r["name"] == "duet"]
    base = {r["batch"]: r["decode_tok_s"] for r in rows if r["context"] == min(context)}
    table = Table(title=f"decode speed vs context and batch (embedded architecture, {report['threads']} threads, "
                        f"{new_tokens} new tokens)")
    for col in ("batch", "context", "prefill tok/s", "decode tok/s", "vs shortest context"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["batch"]), str(r["context"]), f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}",
                      f"{r['decode_tok_s'] / base[r['batch']]:.2f}x")
    Console().print(table)
    Console().print(f"peak memory: {report['peak_memory_mb']:.0f} MB")


if __name__ == "__main__":
    typer.run(main)
