"""Memory plan of a DeepSeek-V3-family model on N devices: parameters, weights per rank, latent cache.

Every count comes from duet's own `Transformer` built on the meta device (no memory is allocated), so
the plan follows the module tree rather than a formula. Units: parameters are counts, memory is bytes.

Layout over N ranks, as in DeepSeek's reference inference code (`inference/model.py`):
- tensor parallel (split N ways): the column/row-parallel projections of attention (q_proj or q_b_proj,
  kv_b_proj, o_proj, i.e. the heads), the dense MLPs, the shared experts, and the vocabulary-parallel
  embedding and output head;
- expert parallel: each rank holds n_routed_experts / N routed experts;
- replicated: the low-rank down-projections q_a_proj and kv_a_proj_with_mqa (their outputs are shared by
  all heads), the norms, the router, and the MTP modules' eh_proj;
- the MLA latent cache is not split: every rank caches the full latent (kv_lora_rank + qk_rope_head_dim
  numbers per token and layer, MTP layers included) for its own heads to attend over.

Weight dtypes: `fp8` stores the attention, MLP and expert matrices as float8_e4m3 (1 byte) with a float32
scale per 128x128 block, as DeepSeek's published FP8 checkpoint does; the embedding, output head, norms
and eh_proj stay bf16 there (or in the run's dtype: `unquantised`). This is what duet holds when it keeps an FP8
checkpoint's weights FP8 (`duet.model.checkpoint.keeps_fp8`). The router stays float32 in every plan, as duet's
`Gate` keeps it (DeepSeek's checkpoint stores it in bf16: 0.2 GB of difference for V3). The cache is kept in the
activations' dtype: bf16 for fp8 and bf16 weights.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from duet.errors import CheckpointError
from duet.model.checkpoint import count_parameters, keeps_fp8, load_config
from duet.model.config import ModelArgs
from duet.model.model import Transformer

# weight dtype -> the torch dtype of what is not stored in FP8, and of the activations and cache
DTYPES = {"fp8": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float8": "fp8", "e4m3": "fp8"}
FP8_BLOCK = 128  # DeepSeek's weight_block_size
MARGIN = 0.05  # of device memory, kept for activations, workspace and the allocator's fragmentation

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
# parameter names (duet's module tree) split N ways; the routed experts are split by expert
_SPLIT = re.compile(r"^(embed_tokens|lm_head)\.|\.(q_proj|q_b_proj|kv_b_proj|o_proj)\."
                    r"|\.mlp\.(gate|up|down)_proj\.weight$|\.shared_experts\.")
_ROW_PARALLEL = re.compile(r"\.(o_proj|down_proj)\.")  # split along their input dimension
_NOT_FP8 = re.compile(r"^(embed_tokens|lm_head)\.|\.gate\.|\.eh_proj\.")  # matrices DeepSeek keeps in bf16
_GROUPS = ("attention", "dense MLP", "shared experts", "routed experts", "router", "embedding + head",
           "norms + MTP projection")


def parse_memory(text: str) -> int:
    """'140GiB' -> bytes. Binary units KiB, MiB, GiB, TiB (powers of 1024), decimal KB, MB, GB, TB (powers
    of 1000; K, M, G, T alone too), or plain bytes; case-insensitive. ValueError with one line when bad."""
    match = _MEMORY.match(text)
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS:
        raise ValueError(f"{text!r} is not an amount of memory (e.g. 140GiB, 141GB, 512MiB)")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"{text!r} must be more than 0 bytes")
    return value


def weight_dtype(name: str) -> str:
    """A weight dtype name (fp8, bf16, fp16, fp32, or bfloat16, float16, float32) -> its short name."""
    short = DTYPE_ALIASES.get(name.lower(), name.lower())
    if short not in DTYPES:
        raise ValueError(f"{name!r} is not one of {', '.join(DTYPES)}")
    return short


@dataclass(frozen=True)
class Group:
    """One kind of weight (attention, routed experts, ...): its parameters in the whole model and on one rank."""

    name: str
    parameters: int
    rank_parameters: int
    rank_bytes: int  # FP8 block scales included


@dataclass(frozen=True)
class Plan:
    """What one rank holds. Parameters are counts; memory is bytes per device unless said otherwise."""

    nproc: int
    dtype: str  # weight dtype: fp8, bf16, fp16, fp32
    device_memory: int
    max_batch: int
    max_seq_len: int
    parameters_main: int  # the main model, as DeepSeek counts its 671B
    parameters_mtp: int  # the MTP modules' own (their embedding and head are the main model's, in memory)
    parameters_mtp_stored: int  # ... plus the copies of embedding and head a checkpoint stores per module
    activated: int  # read by one token's pass through the main model (routed experts at top-k)
    activated_mtp: int  # ... through one MTP module, its shared head included
    groups: tuple[Group, ...]
    weight_bytes: int
    cache_layers: int  # main layers + MTP layers
    cache_bytes_per_token: int  # all layers, on every rank (the latent is not split)
    cache_bytes: int  # max_batch x max_seq_len tokens
    margin_bytes: int
    free_bytes: int  # after weights, cache and margin; negative when short
    cache_tokens: int  # tokens of cache that fit beside the weights and the margin

    @property
    def weights_fit(self) -> bool:
        return self.weight_bytes + self.margin_bytes <= self.device_memory

    @property
    def fits(self) -> bool:
        return self.free_bytes >= 0

    def to_dict(self) -> dict:
        return {**asdict(self), "weights_fit": self.weights_fit, "fits": self.fits}


def activated_parameters(model: Transformer) -> tuple[int, int]:
    """Parameters one token's forward pass reads: (main model, MTP module 0; 0 without one).

    Routed experts count at num_experts_per_tok / n_routed_experts and the input embedding at one row (a
    lookup). Of the plausible conventions it is the one closest to all of DeepSeek's published "activated"
    figures: V3 36.6B (published 37B), V2 20.9B (21B), V2-Lite 2.45B (2.4B); counting the whole embedding
    gives 37.6B, 21.4B, 2.66B. Works on meta-device models.
    """
    a = model.args

    def read(module: nn.Module) -> int:
        return sum(p.numel() // a.n_routed_experts * a.num_experts_per_tok if ".experts." in f".{name}" else p.numel()
                   for name, p in module.named_parameters() if not name.startswith("embed_tokens."))

    main = sum(read(layer) for layer in model.layers) + read(model.norm) + read(model.lm_head) + a.hidden_size
    return main, (read(model.mtp[0]) + a.hidden_size if len(model.mtp) else 0)


def meta_model(args: ModelArgs, dtype: str = "bf16", n_mtp: int | None = None) -> Transformer:
    """duet's Transformer for `args` on the meta device: shapes and dtypes, no memory (0.2 s for V3)."""
    with torch.device("meta"):
        return Transformer(args, dtype=DTYPES[dtype], n_mtp=n_mtp)


def make_plan(args: ModelArgs, device_memory: int, nproc: int = 1, dtype: str = "bf16",
              max_batch: int = 1, max_seq_len: int | None = None, n_mtp: int | None = None,
              unquantised: str = "bf16") -> Plan:
    """Plan `args` on `nproc` devices of `device_memory` bytes each, weights in `dtype` (see the module
    docstring; with fp8, the other weights and the cache in `unquantised`), a latent cache of `max_batch` x
    `max_seq_len` tokens (default: the model's context), and `n_mtp` MTP modules (default: the config's).
    ValueError with one line for impossible values."""
    dtype = weight_dtype(dtype)
    unquantised = weight_dtype(unquantised) if dtype == "fp8" else dtype
    if unquantised == "fp8":
        raise ValueError("the weights FP8 does not cover cannot be fp8")
    if nproc < 1 or max_batch < 1 or device_memory < 1 or (max_seq_len is not None and max_seq_len < 1):
        raise ValueError("nproc, max_batch, max_seq_len and the device memory must be positive")
    for name, n in (("num_attention_heads", args.num_attention_heads), ("n_routed_experts", args.n_routed_experts)):
        if n and n % nproc:
            raise ValueError(f"{nproc} processes cannot split the model's {name}={n} evenly")
    model = meta_model(args, unquantised, n_mtp)
    max_seq_len = max_seq_len or args.max_position_embeddings

    sizes = {g: [0, 0, 0] for g in _GROUPS}  # parameters, per-rank parameters, per-rank bytes
    tensors: dict[int, tuple[str, Tensor]] = {}  # shared tensors (tied or MTP heads) once, under their first name
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        tensors.setdefault(id(t), (name, t))
    for name, t in tensors.values():
        shape = _rank_shape(name, t, nproc)
        size = sizes[_group(name)]
        size[0] += t.numel() if isinstance(t, nn.Parameter) else 0  # buffers are state, not parameters
        size[1] += math.prod(shape) if isinstance(t, nn.Parameter) else 0
        size[2] += _bytes(name, t, shape, dtype)
    groups = tuple(Group(g, *s) for g, s in sizes.items() if s[2])

    weight_bytes = sum(g.rank_bytes for g in groups)
    per_token = model.n_cache_layers * (args.kv_lora_rank + args.qk_rope_head_dim) * DTYPES[unquantised].itemsize
    margin = int(device_memory * MARGIN)
    room = device_memory - weight_bytes - margin
    main = count_parameters(model, include_mtp=False)
    mtp = count_parameters(model) - main
    copies = len(model.mtp) * (model.embed_tokens.weight.numel() + model.lm_head.weight.numel())
    activated, activated_mtp = activated_parameters(model)
    return Plan(nproc=nproc, dtype=dtype, device_memory=device_memory, max_batch=max_batch, max_seq_len=max_seq_len,
                parameters_main=main, parameters_mtp=mtp, parameters_mtp_stored=mtp + copies, activated=activated,
                activated_mtp=activated_mtp, groups=groups, weight_bytes=weight_bytes,
                cache_layers=model.n_cache_layers, cache_bytes_per_token=per_token,
                cache_bytes=max_batch * max_seq_len * per_token, margin_bytes=margin,
                free_bytes=room - max_batch * max_seq_len * per_token, cache_tokens=max(room, 0) // per_token)


def _group(name: str) -> str:
    if name.startswith(("embed_tokens.", "lm_head.")):
        return "embedding + head"
    for part, group in ((".self_attn.", "attention"), (".mlp.experts.", "routed experts"),
                        (".mlp.shared_experts.", "shared experts"), (".mlp.gate.", "router"), (".mlp.", "dense MLP")):
        if part in name:
            return group
    return "norms + MTP projection"


def _rank_shape(name: str, t: Tensor, nproc: int) -> tuple[int, ...]:
    """The shape of the largest shard of `t` on one of `nproc` ranks."""
    shape = list(t.shape)
    if ".mlp.experts." in name:
        shape[0] //= nproc  # whole experts (make_plan checks that nproc divides them)
    elif _SPLIT.search(name):
        dim = 1 if _ROW_PARALLEL.search(name) else 0
        shape[dim] = -(-shape[dim] // nproc)
    return tuple(shape)


def _bytes(name: str, t: Tensor, shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of one rank's shard of `t`: FP8 matrices with their float32 block scales, the rest in their dtype."""
    if dtype == "fp8" and t.dim() >= 2 and not _NOT_FP8.search(name):
        *stack, rows, cols = shape
        scales = math.prod(stack) * -(-rows // FP8_BLOCK) * -(-cols // FP8_BLOCK)
        return math.prod(shape) + 4 * scales
    return math.prod(shape) * t.dtype.itemsize


# ----------------------------------------------------------------------------- the local backend's check


def available_memory(device: str | torch.device) -> int | None:
    """Bytes free for a model on `device`: CUDA's free memory, or the machine's available RAM for the CPU
    (/proc/meminfo's MemAvailable, else psutil's when installed); None when unknown (e.g. mps)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    try:
        import psutil  # not a dependency of duet: used when present (macOS)
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def check_fits(path: str | Path, device: str | torch.device, dtype: torch.dtype, mtp: bool = True,
               nproc: int = 1, fp8_weights: str = "auto") -> None:
    """Refuse, before any weight is read, a checkpoint whose weights (as the loader holds them: dequantised to
    `dtype`, or FP8 kept FP8 as `fp8_weights` decides, the rest in `dtype`) and margin exceed what `device` has
    free: CheckpointError with one line saying what to do. Over
    `nproc` ranks (torchrun), each rank's share is checked against its own device, or against its share of the
    machine's memory on the CPU, where every rank takes from the same RAM.

    The latent cache grows with the sequences, so it is not required up front; `duet plan` reports how many
    tokens of it fit. No check where the free memory is unknown."""
    available = available_memory(device)
    if available is None:
        return
    if torch.device(device).type == "cpu":
        available //= nproc
    args = load_config(path)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    try:
        plan = make_plan(args, dtype="fp8" if keeps_fp8(args, device, fp8_weights) else name, unquantised=name,
                         device_memory=available, max_seq_len=1, n_mtp=None if mtp else 0, nproc=nproc)
    except ValueError as e:  # heads or experts that the ranks cannot split
        raise CheckpointError(f"{path}: {e}") from None
    if plan.weights_fit:
        return
    halve = " --dtype bfloat16 (half the memory)," if name == "fp32" else ""
    where = f"{device} has {gib(available)} free" + (f" per rank of {nproc}" if nproc > 1 else "")
    raise CheckpointError(
        f"{path}: its weights need {gib(plan.weight_bytes)} in {plan.dtype}{' per rank' if nproc > 1 else ''} "
        f"(+{gib(plan.margin_bytes)} of working margin) but {where}; use{halve} a smaller model, or split it over "
        f"more GPUs (`duet plan --model {path} --nproc N` says how many; then `torchrun --nproc-per-node N -m duet "
        "...`, or vLLM or SGLang with --base-url)")


def gib(n: int) -> str:
    """Bytes as GiB, e.g. '87.3 GiB' (MiB under 1 GiB, KiB under 1 MiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 2**10:,.1f} KiB"
