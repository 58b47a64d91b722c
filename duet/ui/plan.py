"""`duet plan`: will a model fit N devices? (mounted by duet.cli; torch is imported only when it runs)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer

DEFAULT_DEVICE_MEMORY = "140GiB"  # one H200: it reports 143,771 MiB


def plan_command(
    model: Annotated[Optional[str], typer.Option("--model", "-m", metavar="DIR|FILE",
                     help="Checkpoint directory or its config.json [default: the embedded model].")] = None,
    nproc: Annotated[int, typer.Option("--nproc", "-n", min=1, metavar="N",
                     help="Devices (processes): tensor parallel, routed experts expert parallel.")] = 1,
    device_memory: Annotated[str, typer.Option("--device-memory", metavar="SIZE",
                             help="Memory of each device: 140GiB, 141GB, 512MiB, ...")] = DEFAULT_DEVICE_MEMORY,
    dtype: Annotated[Optional[str], typer.Option("--dtype", metavar="fp8|bf16|fp16|fp32", show_default=False,
                     help="Weight dtype [default: fp8 for an FP8 checkpoint, else bf16].")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, metavar="B",
                         help="Sequences whose latent cache is held at once.")] = 1,
    max_seq_len: Annotated[Optional[int], typer.Option("--max-seq-len", min=1, metavar="S", show_default=False,
                           help="Tokens per sequence [default: the model's context].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Plan a model's memory on N devices: parameters, weights per rank, latent cache, and whether it fits.

    Counts come from duet's own model built on the meta device (nothing is allocated, no weight is read).
    Per rank: attention heads, dense MLPs, shared experts, embedding and head are split N ways, routed experts
    N ways by expert; the latent cache is not split. 5% of each device is kept for activations and workspace.
    """
    from duet.errors import DuetError
    from duet.model.plan import make_plan, parse_memory, weight_dtype

    try:
        memory = parse_memory(device_memory)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--device-memory'") from None
    try:
        short = None if dtype is None else weight_dtype(dtype)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--dtype'") from None
    from duet.model import load_config
    from duet.model.embedded import default_model_path

    try:
        path = model or str(default_model_path())
        args = load_config(path)
    except DuetError as e:
        raise typer.BadParameter(str(e), param_hint="'--model'") from None
    try:
        plan = make_plan(args, nproc=nproc, dtype=short or ("fp8" if args.fp8_block_size else "bf16"),
                         device_memory=memory, max_batch=max_batch, max_seq_len=max_seq_len)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--nproc'") from None
    if as_json:
        sys.stdout.write(json.dumps({"model": path, **plan.to_dict()}, indent=2) + "\n")
    else:
        _show(path, plan)


def _show(path: str, plan: Any) -> None:
    """The plan as a per-rank table, then the verdict."""
    from rich.table import Table
    from rich.text import Text

    from duet.model.plan import MARGIN, gib
    from duet.terminal import SafeConsole

    console = SafeConsole(highlight=False, markup=False)
    console.print(f"{path}: {plan.nproc} x {gib(plan.device_memory)}, {plan.dtype} weights", style="bold")
    console.print(f"parameters: {_count(plan.parameters_main)} main model, {_count(plan.parameters_mtp)} MTP "
                  f"({_count(plan.parameters_mtp_stored)} as stored, with its embedding and head); "
                  f"{_count(plan.activated)} activated per token")
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("per rank", no_wrap=True)
    table.add_column("parameters", justify="right", no_wrap=True)
    table.add_column("memory", justify="right", no_wrap=True)
    for g in plan.groups:
        table.add_row(g.name, _count(g.rank_parameters), gib(g.rank_bytes))
    table.add_section()
    table.add_row("weights", "", gib(plan.weight_bytes), style="bold")
    per_token = f"{plan.cache_bytes_per_token / 1024:,.1f} KiB/token x {plan.max_batch} x {plan.max_seq_len:,}"
    table.add_row(f"latent cache ({plan.cache_layers} layers)", per_token, gib(plan.cache_bytes))
    table.add_row("margin (activations, workspace)", f"{MARGIN:.0%}", gib(plan.margin_bytes))
    table.add_row("left", "", gib(plan.free_bytes), style="" if plan.fits else "red")
    console.print(table)
    console.print(f"cache that fits beside the weights: {plan.cache_tokens:,} tokens")
    verdict = "fits: yes" if plan.fits else "fits: no" + ("" if plan.weights_fit else " (not even the weights)")
    console.print(Text(verdict, style="bold green" if plan.fits else "bold red"))


def _count(n: int) -> str:
    """A parameter count as 671.0B, 7.9M, 12.3K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:,.1f}{unit}"
    return str(n)
