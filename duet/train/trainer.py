"""`duet train`: the embedded default model, trained from scratch on CPU (or GPU) in about two hours.

The V3 recipe at small scale:
- next-token cross-entropy plus lambda times the MTP loss (the MTP module predicts token i+2 from the
  main model's hidden state at i and the embedding of token i+1: the causal chain of the V3 paper);
- auxiliary-loss-free load balancing: after every step each MoE layer's per-expert routing bias moves
  by +gamma for under-loaded experts and -gamma for over-loaded ones (it only affects which experts are
  chosen, never their weights); the log records max/mean expert load.

Batches are packed from the deterministic `example_stream` seeded by (seed, step), so a run resumed
from its checkpoint sees exactly the data it would have seen, and runs are reproducible.

Data parallel: `accelerate launch [--num_processes N] -m duet.train ...` (or torchrun) runs one trainer per
process through Hugging Face Accelerate: the model is wrapped in DDP (gradients averaged over the processes),
bf16 autocast is accelerate's mixed precision, and process r packs its batches from the stream seeded by
(seed, step, r) (process 0's is the one-process stream), so each step trains on batch_size x N sequences.
The expert loads are summed over the processes before the routing biases move, so every process keeps the
same biases; only the main process logs and writes checkpoints. One process is plain torch, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from duet.errors import DuetError
from duet.model import ModelArgs, Transformer, count_parameters, load_model, save_model
from duet.model.model import MoE
from duet.train.conversations import Conversation
from duet.train.data import MIX, example_stream
from duet.train.sources import Sources
from duet.train.tokenizer import train_tokenizer


class TrainError(DuetError):
    """A run that cannot start, continue or be installed; the message says why."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved beside the checkpoint)."""

    data_dir: str = "../shared/data"
    out_dir: str = "runs/embedded"
    seed: int = 0
    steps: int = 1900
    batch_size: int = 12
    seq_len: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3
    bias_gamma: float = 1e-3
    save_every: int = 100
    vocab_size: int = 2048
    tokenizer_sample: int = 20000  # conversations the tokenizer is trained on
    threads: int = 0  # 0: torch's default
    device: str = "auto"  # auto: CUDA when present, else CPU
    bf16: bool = True  # bf16 autocast for matmuls (weights and optimizer stay fp32)
    mix: dict = field(default_factory=lambda: dict(MIX))  # how often each data source is drawn
    init_from: str | None = None  # start from this model directory's weights and tokenizer (fresh optimizer)
    onpolicy: str | None = None  # the model's own attempts (duet.train.onpolicy), drawn as mix["onpolicy"]
    processes: int = 1  # data-parallel processes (set from `accelerate launch`); a step trains batch_size x processes
    model: dict = field(default_factory=lambda: {
        "hidden_size": 256, "num_hidden_layers": 5, "num_attention_heads": 4, "intermediate_size": 640,
        "moe_intermediate_size": 160, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
        "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1, "q_lora_rank": 96, "kv_lora_rank": 64,
        "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "routed_scaling_factor": 1.0,
        "max_position_embeddings": 2048, "num_nextn_predict_layers": 1,
    })


# ----------------------------------------------------------------------------- tokens and masks


def encode_example(tokenizer, conv: Conversation) -> tuple[list[int], list[bool]]:
    """Token ids of the whole conversation and, per token, whether the model is trained to write it.

    Trained: the final assistant message and its end-of-turn token, except the contents of output
    blocks (duet writes those, the model only writes the ```output stop string that asks for them).
    """
    prefix = tokenizer.apply_chat_template(conv.messages[:-1], tokenize=False, add_generation_prompt=True)
    content = conv.messages[-1]["content"]
    text = prefix + content + tokenizer.eos_token
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(len(prefix), len(text))]
    for start in _find_all(content, "```output"):
        open_end = len(prefix) + start + len("```output")
        close = content.find("```\n", start + len("```output"))
        close_end = len(prefix) + (close + 4 if close >= 0 else len(content))
        spans = _subtract(spans, (open_end, close_end))
    mask = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return enc["input_ids"], mask


def _find_all(text: str, needle: str) -> list[int]:
    out, i = [], text.find(needle)
    while i >= 0:
        out.append(i)
        i = text.find(needle, i + 1)
    return out


def _subtract(spans: list[tuple[int, int]], cut: tuple[int, int]) -> list[tuple[int, int]]:
    out = []
    for s, e in spans:
        if cut[1] <= s or cut[0] >= e:
            out.append((s, e))
            continue
        if s < cut[0]:
            out.append((s, cut[0]))
        if cut[1] < e:
            out.append((cut[1], e))
    return out


PROCESS_STREAM_STRIDE = 1 << 40  # the streams of process r are seeded past every step of process r-1


def batch_for_step(tokenizer, sources: Sources, cfg: TrainConfig, step: int, process: int = 0) -> tuple[Tensor, Tensor]:
    """Packed [B, T+1] token ids and target mask for `step` of data-parallel `process`, the same on every run and
    resume; each process draws its own stream (process 0's is a one-process run's)."""
    stream = example_stream(sources, seed=cfg.seed * 1_000_003 + step + process * PROCESS_STREAM_STRIDE, mix=cfg.mix)
    need = cfg.batch_size * (cfg.seq_len + 1)
    ids: list[int] = []
    mask: list[bool] = []
    skipped = 0
    while len(ids) < need:
        conv = next(stream)
        t, m = encode_example(tokenizer, conv)
        if len(t) > cfg.seq_len + 1:
            skipped += 1
            if skipped > 1000:
                raise TrainError(f"1000 examples in a row are longer than seq_len={cfg.seq_len} tokens; "
                                 "raise --seq-len")
            continue
        skipped = 0
        ids += t
        mask += m
    ids_t = torch.tensor(ids[:need]).view(cfg.batch_size, cfg.seq_len + 1)
    mask_t = torch.tensor(mask[:need]).view(cfg.batch_size, cfg.seq_len + 1)
    return ids_t, mask_t


# ----------------------------------------------------------------------------- losses and balancing


def losses(model: Transformer, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """(next-token loss, MTP loss) on the trained positions of a packed batch ids [B, T+1]."""
    inputs, targets, tmask = ids[:, :-1], ids[:, 1:], mask[:, 1:]
    h = model.hidden(inputs)  # under the caller's autocast: bf16 matmuls are ~3x faster on CPUs with AVX512-BF16
    main = _masked_ce(model.logits(h), targets, tmask)
    if not len(model.mtp):
        return main, None
    # position i: main hidden h_i and embedding of token i+1 -> predict token i+2
    mtp_logits, _ = model.mtp_logits(0, h[:, :-1], inputs[:, 1:])
    return main, _masked_ce(mtp_logits, targets[:, 1:], tmask[:, 1:])


def token_logprobs(model: Transformer, ids: Tensor) -> Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) under ``model`` for a (right-padded) batch ids [B, T]: [B, T-1]."""
    logits = model.logits(model.hidden(ids[:, :-1])).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def _masked_ce(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    m = mask.flatten().float()
    return (loss * m).sum() / m.sum().clamp(min=1)


@torch.no_grad()
def balance_experts(model: Transformer, gamma: float, reduce=None) -> float:
    """Auxiliary-loss-free balancing: nudge each expert's routing bias toward the mean load.

    `reduce` (data parallel) sums the token counts over the processes first, so that every process moves its
    biases by the same step (each one's own counts would move them apart).
    Returns the worst max/mean expert load over the MoE layers for this step (1.0 is perfect).
    """
    moes = [m for m in model.modules() if isinstance(m, MoE) and m.last_expert_load is not None]
    if not moes:
        return 1.0
    counts = torch.cat([m.last_expert_load for m in moes])
    if reduce is not None:
        counts = reduce(counts)
    worst = 1.0
    for module, load in zip(moes, counts.float().split([len(m.last_expert_load) for m in moes]), strict=True):
        bias = module.gate.e_score_correction_bias
        if bias is not None:
            bias += gamma * torch.sign(load.mean() - load)
        worst = max(worst, float(load.max() / load.mean().clamp(min=1e-9)))
    return worst


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- the run


def build_model(cfg: TrainConfig, tokenizer) -> Transformer:
    fields = {**cfg.model, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    args = ModelArgs(**fields)
    args.validate()
    g = torch.Generator().manual_seed(cfg.seed)
    return Transformer(args).init_weights(std=0.02, generator=g)


# settings that do not change what is trained: a run may be resumed with other values
RESUMABLE_WITH_OTHER = ("out_dir", "steps", "save_every", "threads", "device")


def config_differences(saved: TrainConfig, cfg: TrainConfig) -> list[tuple[str, object, object]]:
    """(setting, saved value, new value) for each setting in which `cfg` would train differently from `saved`."""
    def norm(name: str, value):
        if name in ("data_dir", "init_from", "onpolicy") and value is not None:
            return str(Path(value).resolve())
        return value

    return [(f.name, getattr(saved, f.name), getattr(cfg, f.name)) for f in fields(TrainConfig)
            if f.name not in RESUMABLE_WITH_OTHER
            and norm(f.name, getattr(saved, f.name)) != norm(f.name, getattr(cfg, f.name))]


def _setting(name: str, value) -> str:
    if isinstance(value, dict) and name == "mix":
        value = ",".join(f"{k}={v:g}" for k, v in value.items())
    return f"{name.replace('_', '-')}={value}"


def _load_state(cfg: TrainConfig, state_path: Path) -> dict:
    """The saved trainer state of the run in cfg.out_dir, refused unless cfg continues that same run."""
    out = Path(cfg.out_dir)
    state = torch.load(state_path, weights_only=False)
    known = {f.name for f in fields(TrainConfig)}
    saved = TrainConfig(**{k: v for k, v in state["config"].items() if k in known})
    diffs = config_differences(saved, cfg)
    if diffs:
        raise TrainError(f"{out} holds a run with {', '.join(_setting(n, old) for n, old, _ in diffs)}; this command "
                         f"has {', '.join(_setting(n, new) for n, _, new in diffs)} (use another --out, or the same "
                         "settings to resume)")
    if state["step"] >= cfg.steps:
        raise TrainError(f"{out} is already at step {state['step']} of {cfg.steps}; nothing to train (its "
                         f"checkpoint: {state_path.parent}; pass a larger --steps to continue it)")
    return state


def train(cfg: TrainConfig, progress: bool = True, log=print) -> Path:
    """Train (or resume) into cfg.out_dir; returns the final checkpoint directory.

    Everything is read and checked (the data, a saved run's settings, --init-from) before cfg.out_dir is written.
    Under `accelerate launch` every process runs this (data parallel, see the module's docstring); only the
    main process logs and writes, and all of them return once the final checkpoint is written.
    """
    from duet.engine.engine import load_tokenizer  # one-line errors for a missing or broken tokenizer

    if cfg.steps < 1:
        raise TrainError(f"steps={cfg.steps}: train at least one step")
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out}: exists and is not a directory")
    accelerator = _accelerator(cfg)
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    cfg = replace(cfg, processes=world)
    if not is_main:
        log, progress = (lambda *_: None), False
    ckpt = out / "checkpoint"
    state_path = ckpt / "trainer_state.pt"
    state = _load_state(cfg, state_path) if state_path.exists() else None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    sources = Sources.load(Path(cfg.data_dir), Path(cfg.onpolicy) if cfg.onpolicy else None)

    if state is not None:
        tokenizer = load_tokenizer(ckpt)
        model = load_model(ckpt)
        start = state["step"]
        log(f"resuming {out} at step {start}")
    elif cfg.init_from:
        tokenizer = load_tokenizer(cfg.init_from)
        model = load_model(cfg.init_from, dtype=torch.float32)
        start = 0
        log(f"starting from the weights of {cfg.init_from}")
    else:  # every process trains the same tokenizer (deterministic; checked below)
        sample = itertools.islice(example_stream(sources, seed=cfg.seed + 99, mix=cfg.mix), cfg.tokenizer_sample)
        texts = (m["content"] for c in sample for m in c.messages)
        tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size)
        model = build_model(cfg, tokenizer)
        start = 0
    if world > 1:
        _check_processes_agree(accelerator, start, tokenizer, out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        sources.write_dev(out / "dev")
    device = accelerator.device
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    # DDP over the processes (one process: the module itself), its forward under the bf16 autocast
    with warnings.catch_warnings():  # torch's new name for it, forward_sync_buffers, is unknown to accelerate
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        objective, opt = accelerator.prepare(_Objective(model), opt)
    n_params = count_parameters(model)
    if world > 1:
        log(f"device: {device.type}, {world} processes (data parallel: {cfg.batch_size} x {world} sequences a step)")
    else:
        log(f"device: {_one_device(cfg, device)}")
    log(f"model: {n_params / 1e6:.2f}M parameters ({count_parameters(model, include_mtp=False) / 1e6:.2f}M "
        f"without MTP), vocab {len(tokenizer)}")

    reduce_loads = (lambda counts: accelerator.reduce(counts, "sum")) if world > 1 else None
    bar = _Progress(cfg.steps, start) if progress else None
    tokens_done, t0 = 0, time.perf_counter()
    try:
        with open(out / "train_log.jsonl", "a") if is_main else contextlib.nullcontext() as log_file:
            for step in range(start, cfg.steps):
                ids, mask = (t.to(device) for t in batch_for_step(tokenizer, sources, cfg, step, rank))
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, cfg)
                main, mtp = objective(ids, mask)
                loss = main + cfg.mtp_lambda * mtp if mtp is not None else main
                # (loss, main, mtp) averaged over the processes: all of them stop together on a non-finite loss
                seen = torch.stack([loss.detach(), main.detach(), *([mtp.detach()] if mtp is not None else [])])
                if world > 1:
                    seen = accelerator.reduce(seen, "mean")
                total, main_loss, *mtp_loss = seen.tolist()
                if not math.isfinite(total):
                    raise TrainError(f"the loss became {total} at step {step + 1}; stopped without saving "
                                     f"(the last checkpoint, if any, is in {ckpt}; try a lower --lr)")
                opt.zero_grad(set_to_none=True)
                accelerator.backward(loss)  # DDP averages the gradients over the processes
                accelerator.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
                opt.step()
                load = balance_experts(model, cfg.bias_gamma, reduce=reduce_loads)
                tokens_done += ids.numel() * world
                rate = tokens_done / (time.perf_counter() - t0)
                record = {"step": step + 1, "loss": round(main_loss, 4),
                          "mtp_loss": round(mtp_loss[0], 4) if mtp_loss else None,
                          "lr": round(lr_at(step, cfg), 6), "max_over_mean_load": round(load, 3),
                          "tokens_per_s": round(rate), "time": round(time.time())}
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                if bar is not None:
                    bar.update(step + 1, record)
                if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                    if not all_finite(model.state_dict().values()):  # the same weights on every process
                        raise TrainError(f"the weights are no longer finite at step {step + 1}; stopped without "
                                         f"saving (the last checkpoint, if any, is in {ckpt}; try a lower --lr)")
                    if is_main:
                        save_checkpoint(accelerator.unwrap_model(objective).model, tokenizer, opt, cfg, step + 1, out)
    finally:
        if bar is not None:
            bar.close()
    accelerator.wait_for_everyone()  # every process returns once the final checkpoint is written
    return ckpt


class _Objective(torch.nn.Module):
    """The training losses as a module's forward: what `accelerator.prepare` wraps (DDP syncs the gradients of
    what runs through its forward; bf16 autocast wraps it)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        return losses(self.model, ids, mask)


def _accelerator(cfg: TrainConfig):
    """The `accelerate.Accelerator` of this run: the processes of `accelerate launch` (or torchrun), or this one.

    Mixed precision is accelerate's bf16 autocast (--bf16, the default) or none (--fp32); `accelerate launch
    --mixed_precision bf16` agrees with the default, fp16 or fp8 (or bf16 with --fp32) is refused (its `no`, also
    what it sets when not asked, leaves the choice to --bf16/--fp32). --device cpu (or auto without CUDA) trains on
    CPUs (gloo between processes); cuda:N picks the GPU of a one-process run (launched processes take one each).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    precision = "bf16" if cfg.bf16 else "no"
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched == "bf16" and precision == "no":
        raise TrainError("accelerate launch asks for mixed precision bf16 and duet train for --fp32; leave out one")
    if launched not in ("no", "bf16"):
        raise TrainError(f"accelerate launch asks for mixed precision {launched}; duet train trains with bf16 autocast "
                         "(the default) or in fp32 (--fp32): launch with --mixed_precision bf16 or no")
    if AcceleratorState._shared_state and not torch.distributed.is_initialized():
        # one process that trained before with other settings (accelerate keeps them process-wide): start afresh
        AcceleratorState._reset_state(reset_partial_state=True)
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=precision,
        # the routing biases are buffers that each process moves by the same (summed) loads: not broadcast
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    if cfg.device.startswith("cuda:"):
        if accelerator.num_processes > 1:
            raise TrainError(f"--device {cfg.device}: each launched process trains on its own GPU; leave --device out "
                             "(choose GPUs with accelerate launch --gpu_ids)")
        torch.cuda.set_device(torch.device(cfg.device))
    return accelerator


def _one_device(cfg: TrainConfig, device: torch.device) -> torch.device:
    """The device a one-process run names in its log (cuda:N as asked)."""
    return torch.device(cfg.device) if cfg.device.startswith("cuda:") else device


def _check_processes_agree(accelerator, start: int, tokenizer, out: Path) -> None:
    """Refuse processes that would train different runs: a checkpoint only some of them see, or tokenizers that
    differ."""
    from accelerate.utils import gather_object

    vocab = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    seen = gather_object([(start, vocab)])
    if len(set(seen)) > 1:
        steps = sorted({s for s, _ in seen})
        why = (f"the processes see {out} at different steps ({', '.join(map(str, steps))}): put --out on a file "
               "system every node shares") if len(steps) > 1 else "the processes built different tokenizers"
        raise TrainError(why)


def all_finite(tensors) -> bool:
    """Whether every floating-point value of `tensors` is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def save_checkpoint(model: Transformer, tokenizer, opt, cfg, step: int, out: Path, extra: dict | None = None) -> None:
    """Write checkpoint + optimizer state (and `extra` run state) atomically (a kill mid-save keeps the
    previous one). `cfg` is the run's config dataclass."""
    tmp = out / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    save_model(model, tmp)
    model.train()
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": opt.state_dict(), "step": step, "config": asdict(cfg), **(extra or {})},
               tmp / "trainer_state.pt")
    old = out / "checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if (out / "checkpoint").exists():
        os.replace(out / "checkpoint", old)
    os.replace(tmp, out / "checkpoint")
    shutil.rmtree(old, ignore_errors=True)


class _Progress:
    """A small rich progress bar showing loss, MTP loss, load balance and speed."""

    def __init__(self, total: int, start: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(), TimeRemainingColumn(),
                          TextColumn("{task.fields[info]}"))
        self.task = self.p.add_task("train", total=total, completed=start, info="")
        self.p.start()

    def update(self, step: int, r: dict) -> None:
        info = (f"loss {r['loss']:.3f} mtp {r['mtp_loss'] or 0:.3f} load {r['max_over_mean_load']:.2f} "
                f"{r['tokens_per_s']} tok/s")
        self.p.update(self.task, completed=step, info=info)

    def close(self) -> None:
        self.p.stop()


def install_model(checkpoint: Path, target: Path | None = None) -> Path:
    """Copy a trained checkpoint's model and tokenizer files (not the optimizer) to the embedded model folder.

    Refuses (TrainError) a checkpoint that is missing, has no weights, or holds a weight that is not finite.
    """
    from safetensors.torch import load_file

    from duet.model.embedded import EMBEDDED_DIR

    checkpoint = Path(checkpoint)
    weights = sorted(checkpoint.glob("*.safetensors")) if checkpoint.is_dir() else []
    if not (checkpoint / "config.json").is_file() or not weights:
        raise TrainError(f"{checkpoint}: no trained checkpoint (config.json and *.safetensors) to install")
    if not all(all_finite(load_file(f).values()) for f in weights):
        raise TrainError(f"{checkpoint}: holds weights that are not finite (NaN or inf); not installed")
    target = Path(target or EMBEDDED_DIR)
    target.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():
        if f.name != "trainer_state.pt" and f.is_file():
            shutil.copy2(f, target / f.name)
    return target
