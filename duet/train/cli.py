"""The `duet train` command (mounted by duet.cli; also `python -m duet.train`)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import typer

from duet.train.data import MIX, SOURCES  # no torch: `duet --help` stays fast


def train_command(
    out: Path = typer.Option(Path("runs/embedded"), "--out", help="Run directory; resumes the run it holds when "
                             "the settings match (--steps, --save-every, --threads and --device may differ)."),
    data: Path = typer.Option(Path("../shared/data"), "--data", help="Folder with gsm8k/ and mawps_asdiv_a/."),
    steps: int = typer.Option(1900, help="Optimizer steps."),
    batch_size: int = typer.Option(12, help="Sequences per step."),
    seq_len: int = typer.Option(512, help="Tokens per packed sequence."),
    lr: float = typer.Option(2e-3, help="Peak learning rate (warmup, then cosine to 10%)."),
    mtp_lambda: float = typer.Option(0.3, help="Weight of the MTP loss."),
    bias_gamma: float = typer.Option(1e-3, help="Step of the auxiliary-loss-free routing-bias update."),
    seed: int = typer.Option(0, help="Seed of weights and data."),
    save_every: int = typer.Option(100, help="Checkpoint every N steps."),
    threads: int = typer.Option(0, help="torch threads (0: default)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    bf16: bool = typer.Option(True, "--bf16/--fp32", help="bf16 autocast for matmuls."),
    mix: str = typer.Option(",".join(f"{k}={v}" for k, v in MIX.items()), help="How often each data source is drawn."),
    init_from: Path | None = typer.Option(None, "--init-from", help="Start from this model directory's weights "
                                          "and tokenizer (e.g. duet/assets/model) instead of from scratch."),
    onpolicy: Path | None = typer.Option(None, "--onpolicy", help="The model's own attempts on training problems "
                                         "(python -m duet.train.onpolicy); needs weight onpolicy in --mix."),
    arch: str = typer.Option("", "--arch", metavar="KEY=N,...", help="Architecture of a model trained from scratch, "
                             "over the embedded model's (e.g. num_hidden_layers=8,hidden_size=320); not with "
                             "--init-from."),
    install: bool = typer.Option(False, "--install", help="Copy the final checkpoint into duet/assets/model."),
) -> None:
    """Train the embedded default model (a small DeepSeek-V3) on tool-integrated reasoning data.

    Data parallel over GPUs and nodes: `accelerate launch --num_processes N -m duet.train ARGS` (or torchrun
    --nproc-per-node N -m duet.train ARGS; on CPUs with --device cpu); --batch-size is per process.
    """
    _check_numbers(("--steps", steps, 1), ("--batch-size", batch_size, 1), ("--seq-len", seq_len, 1),
                   ("--save-every", save_every, 1), ("--threads", threads, 0), ("--lr", lr, None),
                   ("--mtp-lambda", mtp_lambda, 0), ("--bias-gamma", bias_gamma, 0))
    weights = parse_mix(mix)
    architecture = _parse_arch(arch)
    if architecture and init_from is not None:
        raise typer.BadParameter("--init-from takes its model's architecture; leave out --arch", param_hint="--arch")
    device = _check_device(device)
    for name in DATA_FILES:
        if not (data / name).is_file():
            raise typer.BadParameter(f"{data} has no {name}; pass --data DIR", param_hint="--data")
    if (problem := unusable_out(out)):
        raise typer.BadParameter(problem, param_hint="--out")
    if init_from is not None and not (init_from / "config.json").is_file():
        raise typer.BadParameter(f"{init_from} has no config.json; pass a model directory", param_hint="--init-from")
    if onpolicy is not None and not onpolicy.is_file():
        what = "is a directory, not a file" if onpolicy.is_dir() else "does not exist"
        raise typer.BadParameter(f"{onpolicy} {what}; build it with python -m duet.train.onpolicy",
                                 param_hint="--onpolicy")
    if weights.get("onpolicy", 0) > 0 and onpolicy is None:
        raise typer.BadParameter("the mix draws onpolicy attempts; pass --onpolicy FILE", param_hint="--mix")
    if onpolicy is not None and not weights.get("onpolicy", 0) > 0:
        raise typer.BadParameter("the attempts are drawn only with weight onpolicy in --mix; add onpolicy=W to "
                                 "--mix, or leave out --onpolicy", param_hint="--onpolicy")

    from duet.train.trainer import TrainConfig, install_model, train

    cfg = TrainConfig(data_dir=str(data), out_dir=str(out), steps=steps, batch_size=batch_size, seq_len=seq_len,
                      lr=lr, mtp_lambda=mtp_lambda, bias_gamma=bias_gamma, seed=seed, save_every=save_every,
                      threads=threads, device=device, bf16=bf16, mix=weights,
                      init_from=str(init_from) if init_from else None, onpolicy=str(onpolicy) if onpolicy else None)
    cfg.model.update(architecture)
    checkpoint = train(cfg)  # under `accelerate launch`: in every process, which return together
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        typer.echo(f"checkpoint: {checkpoint}")
        if install:
            typer.echo(f"installed: {install_model(checkpoint)}")
    state.destroy_process_group()  # launched processes: leave the group before exiting


DATA_FILES = ("gsm8k/train.jsonl", "mawps_asdiv_a/train.csv")  # what the trainer reads under --data


def _check_numbers(*checks: tuple[str, float, float | None]) -> None:
    """(option, value, lowest allowed) for each numeric option; a lowest of None means > 0. One-line usage errors."""
    for option, value, low in checks:
        if not math.isfinite(value) or (value <= 0 if low is None else value < low):
            bound = "> 0" if low is None else f">= {low}"
            number = "an integer" if isinstance(value, int) else "a finite number"
            raise typer.BadParameter(f"{value}: must be {number} {bound}", param_hint=option)


def unusable_out(path: Path, directory: bool = True) -> str | None:
    """Why `path` cannot be written as an output directory (or, with directory=False, a file); None when it can."""
    if path.exists() and path.is_dir() != directory:
        return f"{path}: exists and is not a {'directory' if directory else 'file'}"
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"{path}: {parent} is a file, not a directory"
    return None


def parse_mix(text: str) -> dict[str, float]:
    """'synthetic=0.2,mawps=0.7' -> {'synthetic': 0.2, 'mawps': 0.7}, or a one-line error."""
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise typer.BadParameter(f"{part!r} is not NAME=WEIGHT", param_hint="--mix") from None
        if name.strip() not in SOURCES or not 0 <= weights[name.strip()] < math.inf:
            raise typer.BadParameter(f"{part!r}: sources are {', '.join(SOURCES)} with finite weights >= 0",
                                     param_hint="--mix")
    if not any(weights.values()):
        raise typer.BadParameter("give at least one source a positive weight", param_hint="--mix")
    return weights


def _parse_arch(text: str) -> dict[str, int]:
    """'num_hidden_layers=8,hidden_size=320' -> their values over the default architecture, or a one-line error."""
    from duet.train.trainer import TrainConfig

    known = TrainConfig().model
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = (x.strip() for x in part.partition("="))
        if name not in known:
            raise typer.BadParameter(f"{name!r} is not an architecture key; use some of: {', '.join(known)}",
                                     param_hint="--arch")
        try:
            out[name] = int(value)
        except ValueError:
            raise typer.BadParameter(f"{part!r} is not KEY=INTEGER", param_hint="--arch") from None
        if out[name] < 0 or (out[name] == 0 and name != "first_k_dense_replace"):
            raise typer.BadParameter(f"{part!r}: must be a positive integer", param_hint="--arch")
    return out


def _check_device(device: str) -> str:
    """The --device value, or a one-line error when it is unknown or not present here."""
    if device in ("auto", "cpu"):
        return device
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise typer.BadParameter(f"{device!r}: use auto, cpu, cuda or cuda:N", param_hint="--device")
    import torch

    index = int(device.partition(":")[2] or 0)
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise typer.BadParameter(f"{device} is not available on this machine; use --device cpu", param_hint="--device")
    return device
