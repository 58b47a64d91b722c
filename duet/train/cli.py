"""The `duet train` command (mounted by duet.cli; also `python -m duet.train`)."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from duet.train.data import MIX, SOURCES  # no torch: `duet --help` stays fast


def train_command(
    out: Path = typer.Option(Path("runs/embedded"), "--out", help="Run directory (resumes when it holds a run)."),
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
                                         "(python -m duet.train.onpolicy); drawn with weight onpolicy in --mix."),
    install: bool = typer.Option(False, "--install", help="Copy the final checkpoint into duet/assets/model."),
) -> None:
    """Train the embedded default model (a small DeepSeek-V3) on tool-integrated reasoning data."""
    from duet.train.trainer import TrainConfig, install_model, train

    if not (data / "gsm8k" / "train.jsonl").is_file():
        raise typer.BadParameter(f"{data} has no gsm8k/train.jsonl; pass --data DIR", param_hint="--data")
    weights = _parse_mix(mix)
    if init_from is not None and not (init_from / "config.json").is_file():
        raise typer.BadParameter(f"{init_from} has no config.json; pass a model directory", param_hint="--init-from")
    if onpolicy is not None and not onpolicy.is_file():
        raise typer.BadParameter(f"{onpolicy} does not exist; build it with python -m duet.train.onpolicy",
                                 param_hint="--onpolicy")
    if weights.get("onpolicy", 0) > 0 and onpolicy is None:
        raise typer.BadParameter("the mix draws onpolicy attempts; pass --onpolicy FILE", param_hint="--mix")
    cfg = TrainConfig(data_dir=str(data), out_dir=str(out), steps=steps, batch_size=batch_size, seq_len=seq_len,
                      lr=lr, mtp_lambda=mtp_lambda, bias_gamma=bias_gamma, seed=seed, save_every=save_every,
                      threads=threads, device=_check_device(device), bf16=bf16, mix=weights,
                      init_from=str(init_from) if init_from else None, onpolicy=str(onpolicy) if onpolicy else None)
    checkpoint = train(cfg)
    typer.echo(f"checkpoint: {checkpoint}")
    if install:
        typer.echo(f"installed: {install_model(checkpoint)}")


def _parse_mix(text: str) -> dict[str, float]:
    """'synthetic=0.2,mawps=0.7' -> {'synthetic': 0.2, 'mawps': 0.7}, or a one-line error."""
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise typer.BadParameter(f"{part!r} is not NAME=WEIGHT", param_hint="--mix") from None
        if name.strip() not in SOURCES or weights[name.strip()] < 0:
            raise typer.BadParameter(f"{part!r}: sources are {', '.join(SOURCES)} with weights >= 0",
                                     param_hint="--mix")
    if not any(weights.values()):
        raise typer.BadParameter("give at least one source a positive weight", param_hint="--mix")
    return weights


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
