"""Tensor and expert parallelism: one model split over the ranks of a torch.distributed process group.

The layout of DeepSeek's reference inference code (`inference/model.py`: ParallelEmbedding, ColumnParallelLinear,
RowParallelLinear, experts split by rank), in duet's module tree. `parallelize` turns a `Transformer` (built on
the meta device by the loader) into one rank's part of it by swapping in the classes below, and
`load_parallel_model` fills that part from the checkpoint's memory-mapped safetensors, each rank reading only
its own slice of each split tensor (`duet.model.checkpoint.load_model` with a `shard`). Over N ranks:

- vocabulary parallel: the embedding and the output head hold vocab/N rows each;
- tensor parallel by heads: MLA's q_proj (or q_b_proj) and kv_b_proj are column-parallel, so each rank computes
  its own heads' queries, keys and values, and runs both the naive and the absorbed path on them; o_proj is
  row-parallel and sums the heads' contributions with an all-reduce;
- dense MLPs and shared experts: gate_proj and up_proj column-parallel, down_proj row-parallel;
- expert parallel: each rank holds n_routed_experts/N routed experts and runs them on every token routed to
  them; one all-reduce adds the ranks' contributions;
- replicated: q_a_proj and kv_a_proj_with_mqa (the query and KV latents are shared by all heads), the norms,
  the router, and the MTP modules' eh_proj. Every rank computes the same KV latent and keeps the whole latent
  cache, whose layout (`KVCache`) is unchanged.

Counts that N does not divide (a vocabulary of 97 over 4 ranks) are dealt as evenly as possible, the lower ranks
taking one more; heads and experts are dealt whole. `duet.model.plan` reports the same layout's memory.

Every rank ends a forward pass with the same hidden states and the full logits, so all ranks must run the same
calls on the same inputs in lockstep. Communication is torch.distributed's: gloo on the CPU, NCCL on CUDA.
Started by torchrun (`torchrun --nproc-per-node 8 script.py`), each rank runs:

    world = init_from_env()
    model = load_parallel_model(path, world.device, torch.bfloat16)
    logits = model(input_ids)  # the same input_ids on every rank -> the same logits [B, S, vocab] on every rank
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from duet.errors import DuetError
from duet.model.checkpoint import Part, load_model
from duet.model.model import MLA, MLP, Experts, Linear, MoE, Transformer, linear

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def split(n: int, ranks: int, unit: int = 1) -> list[tuple[int, int]]:
    """(start, stop) of each rank's part of `n` rows made of whole units of `unit` rows (heads, say):
    the units are dealt as evenly as possible, the lower ranks taking one more when `ranks` does not divide them."""
    units, rest = divmod(n, unit)
    if rest or units < ranks:
        raise ValueError(f"cannot split {n} rows into {ranks} parts of whole units of {unit}")
    base, extra = divmod(units, ranks)
    starts = [r * base + min(r, extra) for r in range(ranks + 1)]
    return [(starts[r] * unit, starts[r + 1] * unit) for r in range(ranks)]


@dataclass(frozen=True)
class World:
    """This process's place among the `size` ranks that share one model, and the device its part lives on."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: dist.ProcessGroup | None = None  # None: the default process group

    @classmethod
    def current(cls, device: str | torch.device | None = None) -> World:
        """The default process group's (one rank alone when there is none)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(device=torch.device(device or "cpu"))
        return cls(dist.get_rank(), dist.get_world_size(), torch.device(device or _default_device()))

    def part(self, n: int, dim: int = 0, unit: int = 1) -> Part:
        """This rank's part of `n` rows (dim 0) or columns (dim 1), in whole units of `unit` (see `split`)."""
        start, stop = split(n, self.size, unit)[self.rank]
        return Part(dim, start, stop)

    def all_reduce(self, x: Tensor) -> Tensor:
        """The sum over ranks of x (any shape), in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: Tensor) -> list[Tensor]:
        """Every rank's x (the same shape on every rank), in rank order."""
        if self.size == 1:
            return [x]
        pieces = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(pieces, x.contiguous(), group=self.group)
        return pieces


def _take(part: Part, t: Tensor) -> nn.Parameter:
    """A parameter holding `part` of t (on the meta device: only its shape and dtype)."""
    return nn.Parameter(part.of(t.detach()).clone(memory_format=torch.contiguous_format), requires_grad=t.requires_grad)


# ----------------------------------------------------------------------------- layers


class ParallelEmbedding(nn.Module):
    """Vocabulary-parallel embedding: this rank holds rows start:stop of the [vocab, D] table.

    ids [B, S] -> [B, S, D]: each rank looks up the ids among its rows (zeros for the others' ids), and an
    all-reduce adds the ranks' parts.
    """

    def __init__(self, embed: nn.Embedding, world: World):
        super().__init__()
        self.world = world
        self.part = world.part(embed.weight.shape[0])
        self.weight = _take(self.part, embed.weight)

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.part.start
        others = (local < 0) | (local >= self.part.size)
        x = F.embedding(local.masked_fill(others, 0), self.weight).masked_fill(others.unsqueeze(-1), 0)
        return self.world.all_reduce(x)


class ColumnParallelLinear(Linear):
    """A linear layer split by its outputs: this rank holds rows start:stop of the [out, in] weight (and, kept FP8,
    the rows of block scales that cover them: `duet.model.checkpoint` splits FP8 weights on block boundaries only).

    x [..., in] -> [..., stop - start], this rank's slice of the outputs (its heads, its part of an MLP's hidden
    layer), with no communication. `unit`: outputs come in whole groups of that many (a head's).
    """

    def __init__(self, linear: nn.Module, world: World, unit: int = 1):
        part = world.part(linear.weight.shape[0], dim=0, unit=unit)
        super().__init__(linear.weight.shape[1], part.size, linear.weight.dtype, device="meta")
        self.part = part
        self.weight = _take(part, linear.weight)


class RowParallelLinear(Linear):
    """A linear layer split by its inputs: this rank holds columns start:stop of the [out, in] weight.

    x [..., stop - start], this rank's slice of the inputs (what a ColumnParallelLinear gave it) -> [..., out],
    the sum of every rank's product, by an all-reduce.
    """

    def __init__(self, linear: nn.Module, world: World, unit: int = 1):
        part = world.part(linear.weight.shape[1], dim=1, unit=unit)
        super().__init__(part.size, linear.weight.shape[0], linear.weight.dtype, device="meta")
        self.world, self.part = world, part
        self.weight = _take(part, linear.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.world.all_reduce(super().forward(x))


class ParallelHead(ColumnParallelLinear):
    """The vocabulary-parallel output head: this rank holds rows start:stop of the [vocab, D] weight.

    h [B, S, D] -> logits [B, S, vocab] on every rank: each rank computes its slice of the logits, an all-gather
    assembles them (slices padded to the widest one, as all-gather needs equal shapes).
    """

    def __init__(self, head: nn.Linear, world: World):
        super().__init__(head, world)
        self.world = world
        self.widths = [stop - start for start, stop in split(head.weight.shape[0], world.size)]

    def forward(self, h: Tensor) -> Tensor:
        logits = linear(h, self.weight)
        if self.world.size == 1:
            return logits
        padded = F.pad(logits, (0, self.widths[0] - logits.shape[-1]))
        pieces = self.world.all_gather(padded)
        return torch.cat([p[..., :w] for p, w in zip(pieces, self.widths, strict=True)], dim=-1)


class ParallelExperts(Experts):
    """This rank's routed experts, experts start:stop of E, stacked as `Experts` stacks them:
    gate_proj, up_proj [E/N, I, D]; down_proj [E/N, D, I] (kept FP8: with their block scales).

    x [T, D], ids, weights [T, k] (global expert ids, from the replicated gate) -> [T, D]: the rank runs its
    experts on the (token, expert) pairs routed to them, and an all-reduce adds the ranks' contributions (each
    pair is computed on exactly one rank).
    """

    def __init__(self, experts: Experts, world: World):
        part = world.part(experts.gate_proj.shape[0])
        _, inter_dim, dim = experts.gate_proj.shape
        super().__init__(part.size, dim, inter_dim, experts.gate_proj.dtype, device="meta")
        self.world, self.part = world, part
        for name in self.PROJECTIONS:
            setattr(self, name, _take(part, getattr(experts, name)))

    def forward(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        local = ids - self.part.start
        token, slot = ((local >= 0) & (local < self.part.size)).nonzero(as_tuple=True)  # this rank's pairs [M]
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if len(token):
            pairs = super().forward(x[token], local[token, slot, None], weights[token, slot, None])  # [M, D]
            y.index_add_(0, token, pairs.float())
        return self.world.all_reduce(y.to(x.dtype))


# ----------------------------------------------------------------------------- the model


def parallelize(model: Transformer, world: World) -> dict[str, Part]:
    """Turn `model` into this rank's part of it, in place (see the module docstring for what is split how).

    The loader calls it on the meta device, then fills the parts; a model with weights keeps copies of its rank's
    slices (plain weights only: the loader keeps FP8 weights FP8 after splitting). Returns the `Part` of every split
    parameter, by name, for the loader.
    """
    if any(name.endswith("scale_inv") for name, _ in model.named_buffers()):
        raise ValueError("parallelize a model before its weights are kept FP8 (load_parallel_model does)")
    for block in [*model.layers, *model.mtp]:
        _split_attention(block.self_attn, world)
        if isinstance(block.mlp, MoE):
            block.mlp.experts = ParallelExperts(block.mlp.experts, world)
            if block.mlp.shared_experts is not None:
                _split_mlp(block.mlp.shared_experts, world)
        else:
            _split_mlp(block.mlp, world)
    tied = model.lm_head.weight is model.embed_tokens.weight
    embed, head = ParallelEmbedding(model.embed_tokens, world), ParallelHead(model.lm_head, world)
    if tied:
        head.weight = embed.weight
    model.share_embedding_and_head(embed, head)
    return {f"{name}.{param}": module.part
            for name, module in model.named_modules() if isinstance(getattr(module, "part", None), Part)
            for param, _ in module.named_parameters(recurse=False)}


def _split_attention(attn: MLA, world: World) -> None:
    """Column-parallel queries and keys/values, row-parallel output, all by whole heads."""
    qk_dim = attn.nope_dim + attn.rope_dim
    if hasattr(attn, "q_proj"):
        attn.q_proj = ColumnParallelLinear(attn.q_proj, world, unit=qk_dim)
    else:
        attn.q_b_proj = ColumnParallelLinear(attn.q_b_proj, world, unit=qk_dim)
    attn.kv_b_proj = ColumnParallelLinear(attn.kv_b_proj, world, unit=attn.nope_dim + attn.v_dim)
    attn.o_proj = RowParallelLinear(attn.o_proj, world, unit=attn.v_dim)
    attn.n_heads = attn.o_proj.part.size // attn.v_dim  # this rank's heads


def _split_mlp(mlp: MLP, world: World) -> None:
    mlp.gate_proj = ColumnParallelLinear(mlp.gate_proj, world)
    mlp.up_proj = ColumnParallelLinear(mlp.up_proj, world)
    mlp.down_proj = RowParallelLinear(mlp.down_proj, world)


# ----------------------------------------------------------------------------- running


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_from_env(device: str | torch.device | None = None, timeout: float = 300.0) -> World:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
    return this rank's `World`: NCCL with GPU LOCAL_RANK when `device` is CUDA (the default when there is
    one), gloo on the CPU. A collective that waits more than `timeout` seconds for another rank (one that died
    or hangs) raises instead of hanging. Already joined: the current group's World."""
    if dist.is_initialized():
        return World.current(device)
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise DuetError(f"{', '.join(missing)} not set: start every rank with torchrun "
                        "(torchrun --nproc-per-node N ...), which sets them")
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(device) if device is not None else _default_device()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) if device.index is None else device.index)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=size, timeout=timedelta(seconds=timeout),
                                device_id=device)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=size, timeout=timedelta(seconds=timeout))
    return World(rank, size, device)


def load_parallel_model(path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32, mtp: bool = True,
                        world: World | None = None, fp8_weights: str = "dequantise") -> Transformer:
    """This rank's part of the checkpoint at `path` (see `duet.model.load_model`, and its `fp8_weights`: FP8 weights
    kept FP8 are split on their 128x128 scale blocks), read slice by slice from the memory-mapped safetensors: no
    rank ever holds the whole model. Every rank of `world` (default: the default process group's) must call it;
    then every forward pass too, with the same inputs."""
    world = world or World.current(device)
    return load_model(path, device or world.device, dtype, mtp, shard=lambda model: parallelize(model, world),
                      fp8_weights=fp8_weights)
