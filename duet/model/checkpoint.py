"""Load and save DeepSeek-V3-family checkpoints in the Hugging Face layout.

A checkpoint directory holds `config.json`, `model.safetensors` or shards listed in
`model.safetensors.index.json`, and tokenizer files. The model is built on the meta device,
allocated once, and filled tensor by tensor from memory-mapped safetensors, so the weights never
sit in memory twice. FP8 weights (float8_e4m3fn with a `weight_scale_inv` per 128x128 block) either stay FP8 in
memory, multiplied by FP8 GEMMs (`duet.model.model.Linear`), or are dequantised block-wise while loading to the
model's dtype: `load_model`'s `fp8_weights` decides (`keeps_fp8`).

Checkpoint names map onto `duet.model.model.Transformer` names:
    model.embed_tokens.weight                  -> embed_tokens.weight
    model.layers.{i}.*            (i < L)      -> layers.{i}.*
    model.layers.{L+k}.*                       -> mtp.{k}.*   (Multi-Token Prediction modules)
    model.layers.{i}.mlp.experts.{e}.gate_proj.weight -> layers.{i}.mlp.experts.gate_proj[e]
    model.norm.weight, lm_head.weight          -> norm.weight, lm_head.weight
The MTP modules' copies of the embedding and output head (`model.layers.{L+k}.embed_tokens`,
`.shared_head.head`) are shared with the main model: they are written on save and not read back.

A tensor-parallel rank (`duet.model.parallel`) loads through the same path, reading only its `Part` (rows,
columns or experts) of each split tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from duet import kernels
from duet.errors import CheckpointError, ConfigError
from duet.model.config import ModelArgs
from duet.model.model import FP8, FP8_BLOCK, Experts, Linear, Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# a stacked expert weight or its FP8 block scales, e.g. layers.3.mlp.experts.gate_proj(_scale_inv)
_EXPERT = re.compile(r"^((?:layers|mtp)\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)(_scale_inv)?$")
FP8_WEIGHTS = ("auto", "keep", "dequantise")  # what loading does with an FP8 checkpoint's weights: see `keeps_fp8`


def load_config(path: str | Path) -> ModelArgs:
    """Read and validate a checkpoint's `config.json`: `path` is the checkpoint directory or the file itself."""
    given = Path(path).expanduser()
    config_path = given if given.is_file() else _checkpoint_dir(given) / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{given}: no {CONFIG_FILE}; is this a Hugging Face checkpoint directory?")
    try:
        cfg = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    try:
        return ModelArgs.from_hf_config(cfg)
    except ConfigError as e:  # its message starts "config.json: "; name the file read
        raise ConfigError(f"{config_path}: {str(e).removeprefix(CONFIG_FILE + ': ')}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               mtp: bool = True, shard: Callable[[Transformer], dict[str, Part]] | None = None,
               fp8_weights: str = "dequantise") -> Transformer:
    """Load a checkpoint directory into a `Transformer` in eval mode.

    `forward(input_ids [B, S])` returns logits [B, S, vocab]. MTP modules are loaded when the
    checkpoint has them (and `mtp` is True). Raises CheckpointError / ConfigError with one line.
    `shard` (see `duet.model.parallel.load_parallel_model`) turns the model, still on the meta device, into
    one rank's part of it and returns the `Part` of each split parameter, by name: only that part is read.
    `fp8_weights` ("auto", "keep", "dequantise"): whether an FP8 checkpoint's weights stay FP8 (`keeps_fp8`); those
    the checkpoint stores unquantised (embedding, head, norms, router) are loaded in `dtype` either way. The default
    dequantises, as training needs; duet's runtime (`duet.engine.Engine.load`) passes the `fp8_weights` setting.
    """
    directory = _checkpoint_dir(path)
    args = load_config(directory)
    keep_fp8 = keeps_fp8(args, device, fp8_weights)
    tensors = _TensorIndex(directory)
    _check_main_layers(tensors, args)
    n_mtp = _count_mtp_layers(tensors, args) if mtp else 0
    with torch.device("meta"):
        model = Transformer(args, dtype=dtype, n_mtp=n_mtp)
    parts = shard(model) if shard is not None else {}
    if keep_fp8:
        parts = _keep_fp8(model, tensors, parts)
    _allocate(model, torch.device(device))
    _fill(model, tensors, dtype, parts)
    model.eval()
    return model


def save_model(model: Transformer, path: str | Path, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write `model` as a Hugging Face checkpoint (config.json + safetensors, sharded when large)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    args = model.args
    cfg = args.to_hf_config()
    cfg["num_nextn_predict_layers"] = len(model.mtp)
    cfg["torch_dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    if not any(p.dtype == FP8 for p in model.parameters()):
        cfg.pop("quantization_config", None)  # the weights were dequantised at load (or never quantised)
    state = dict(_checkpoint_tensors(model))
    shards = _split(state, max_shard_bytes)
    for stale in [directory / WEIGHTS_FILE, directory / INDEX_FILE, *directory.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], directory / WEIGHTS_FILE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return directory


def count_parameters(model: Transformer, include_mtp: bool = True) -> int:
    """Distinct parameters (tied weights counted once)."""
    seen = {id(p): p for name, p in model.named_parameters() if include_mtp or not name.startswith("mtp.")}
    return sum(p.numel() for p in seen.values())


# ----------------------------------------------------------------------------- name mapping


def checkpoint_name(model_name: str, n_layers: int) -> str:
    """The checkpoint key of a Transformer parameter/buffer name (experts excluded)."""
    if model_name == "lm_head.weight":
        return model_name
    match = re.match(r"^mtp\.(\d+)\.(.*)$", model_name)
    if match:
        return f"model.layers.{n_layers + int(match.group(1))}.{match.group(2)}"
    return f"model.{model_name}"


def _expert_key(expert: re.Match, e: int, n_layers: int) -> str:
    """The checkpoint key of expert `e`'s matrix (or its FP8 scales) in a stacked expert tensor matched by `_EXPERT`."""
    suffix = "weight_scale_inv" if expert.group(3) else "weight"
    return f"{checkpoint_name(expert.group(1), n_layers)}.{e}.{expert.group(2)}.{suffix}"


def _checkpoint_tensors(model: Transformer) -> Iterator[tuple[str, Tensor]]:
    """(checkpoint key, tensor) for every weight of the model in the HF layout, experts unstacked."""
    n_layers = len(model.layers)
    # named_parameters() lists a shared tensor once, under its first name: a tied lm_head and the
    # MTP modules' shared head are skipped here. Every tensor is copied, since safetensors refuses
    # tensors that share storage (the experts are views of one stacked parameter).
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        expert = _EXPERT.match(name)
        if expert:
            for e in range(tensor.shape[0]):
                yield _expert_key(expert, e, n_layers), _copy_out(tensor[e])
        else:
            yield checkpoint_name(name, n_layers), _copy_out(tensor)
    for k in range(len(model.mtp)):
        # The V3 layout stores the MTP module's embedding and head as its own tensors.
        prefix = f"model.layers.{n_layers + k}"
        yield f"{prefix}.embed_tokens.weight", _copy_out(model.embed_tokens.weight)
        yield f"{prefix}.shared_head.head.weight", _copy_out(model.lm_head.weight)


def _copy_out(t: Tensor) -> Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _split(state: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Part:
    """Rows (dim 0) or columns (dim 1) start:stop of a tensor: what one tensor-parallel rank holds of it.

    For the stacked routed experts [E, ...], dim 0 counts experts: the rank reads experts start:stop.
    """

    dim: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def of(self, t: Tensor) -> Tensor:
        """This part of a full tensor `t` (a view)."""
        return t.narrow(self.dim, self.start, self.size)

    def index(self) -> tuple[slice, ...]:
        """This part as an index, for a safetensors slice (which has no `narrow`)."""
        return (slice(None),) * self.dim + (slice(self.start, self.stop),)

    def widened(self, block: int) -> Part:
        """The smallest part on `block` boundaries holding this one: FP8 scales cover whole blocks."""
        return Part(self.dim, self.start // block * block, -(-self.stop // block) * block)

    def in_blocks(self, block: int) -> Part:
        """This part (on block boundaries) of a block-scaled tensor, as rows or columns of its scales."""
        return Part(self.dim, self.start // block, -(-self.stop // block))


def _checkpoint_dir(path: str | Path) -> Path:
    directory = Path(path).expanduser()
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (give the checkpoint folder, not a file)")
    return directory


@dataclass
class _TensorIndex:
    """Which safetensors file holds each key, with lazily opened memory-mapped handles."""

    directory: Path

    def __post_init__(self) -> None:
        index_path = self.directory / INDEX_FILE
        single = self.directory / WEIGHTS_FILE
        self.files: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
            for key, file in weight_map.items():
                self.files[key] = self.directory / file
            for file in set(self.files.values()):
                if not file.is_file():
                    raise CheckpointError(f"{self.directory}: shard {file.name} listed in {INDEX_FILE} is missing")
        elif single.is_file():
            for key in self._open(single).keys():
                self.files[key] = single
        else:
            raise CheckpointError(f"{self.directory}: no {WEIGHTS_FILE} or {INDEX_FILE} (the weights are missing)")

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
        return self._handles[file]

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, key: str) -> list[int]:
        """Tensor `key`'s shape, read from the file's header (no data)."""
        return self._open(self.files[key]).get_slice(key).get_shape()

    def get(self, key: str, part: Part | None = None) -> Tensor:
        """Tensor `key`, or only its `part` (read from the memory map by `get_slice`; clipped at the tensor's end)."""
        file = self.files.get(key)
        if file is None:
            raise CheckpointError(f"{self.directory}: tensor {key} is missing from the checkpoint")
        try:
            if part is not None:
                return self._open(file).get_slice(key)[part.index()]
            return self._open(file).get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {key}: corrupt or truncated file ({e})") from None


_MTP_ONLY = re.compile(r"^model\.layers\.(\d+)\.(eh_proj|enorm|hnorm|shared_head)\.")


def _check_main_layers(tensors: _TensorIndex, args: ModelArgs) -> None:
    """Refuse a config whose num_hidden_layers reaches into the MTP modules: their block would load as a
    main layer (same tensor names) and the model would silently run one layer too many."""
    for key in tensors.keys():
        match = _MTP_ONLY.match(key)
        if match and int(match.group(1)) < args.num_hidden_layers:
            layer = int(match.group(1))
            raise CheckpointError(
                f"{tensors.directory}: tensor {key} belongs to an MTP module, but config.json's num_hidden_layers="
                f"{args.num_hidden_layers} reads layer {layer} as a main layer; the checkpoint has {layer} main "
                f"layers (set num_hidden_layers to {layer})")


def _count_mtp_layers(tensors: _TensorIndex, args: ModelArgs) -> int:
    """How many of the config's MTP modules the checkpoint really stores (transformers drops them)."""
    n = 0
    while n < args.num_nextn_predict_layers and any(
        k.startswith(f"model.layers.{args.num_hidden_layers + n}.") for k in tensors.keys()
    ):
        n += 1
    return n


def _read(tensors: _TensorIndex, key: str, block_size: int | None, dtype: torch.dtype,
          part: Part | None = None) -> Tensor:
    """A checkpoint tensor, or its `part`, in `dtype`, dequantising FP8 block-scaled weights.

    The part of an FP8 weight is read widened to whole blocks (its scales' rows or columns), dequantised, and
    cut down to the part: a split point need not fall on a block boundary.
    """
    block = block_size or 128
    scale_key = key.removesuffix(".weight") + ".weight_scale_inv"
    wide = part.widened(block) if part is not None and scale_key in tensors else part
    t = tensors.get(key, wide)
    if t.dtype == torch.float8_e4m3fn:
        if scale_key not in tensors:
            raise CheckpointError(f"{tensors.directory}: FP8 tensor {key} has no {scale_key}")
        scale = tensors.get(scale_key, None if wide is None else wide.in_blocks(block)).float()
        t = kernels.weight_dequant(t.contiguous(), scale, block, dtype=dtype)
    if wide != part:
        t = Part(part.dim, part.start - wide.start, part.stop - wide.start).of(t)
    return t


def keeps_fp8(args: ModelArgs, device: str | torch.device, fp8_weights: str = "auto") -> bool:
    """Whether loading a checkpoint with config `args` on `device` keeps its FP8 weights FP8 in memory.

    `fp8_weights`: "keep" always (on a CPU or an older GPU the FP8 GEMMs run as the block-wise dequantising
    reference: half the memory, slower); "dequantise" never (the weights are dequantised at load to the model's
    dtype); "auto" where FP8 GEMMs run natively (`kernels.fp8_native`: CUDA with compute capability 8.9+). Only 128x128
    blocks (DeepSeek's) can stay FP8: "auto" dequantises others, "keep" refuses them. An unquantised checkpoint (no
    `quantization_config`): False.
    """
    if fp8_weights not in FP8_WEIGHTS:
        raise ValueError(f"fp8_weights={fp8_weights!r}: use one of {', '.join(FP8_WEIGHTS)}")
    if not args.fp8_block_size or fp8_weights == "dequantise":
        return False
    if args.fp8_block_size != FP8_BLOCK:
        if fp8_weights == "keep":
            raise CheckpointError(f"FP8 weights in {args.fp8_block_size}x{args.fp8_block_size} blocks cannot stay FP8 "
                                  f"(fp8_gemm takes {FP8_BLOCK}x{FP8_BLOCK} blocks): use --fp8-weights dequantise")
        return False
    return fp8_weights == "keep" or kernels.fp8_native(device)


def _keep_fp8(model: Transformer, tensors: _TensorIndex, parts: dict[str, Part]) -> dict[str, Part]:
    """Make FP8, on the meta device, every linear layer and stacked expert weight that the checkpoint stores in FP8
    (those with a `weight_scale_inv`), and return `parts` with the parts of their block scales added.

    A tensor-parallel rank's rows or columns of an FP8 weight must start and end on the 128 boundaries of its scale
    blocks (or at the weight's end): otherwise CheckpointError with one line (dequantising at load takes any split).
    """
    n_layers = len(model.layers)
    parts = dict(parts)
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            key = checkpoint_name(f"{name}.weight", n_layers)
            if key.removesuffix(".weight") + ".weight_scale_inv" not in tensors:
                continue
            part = parts.get(f"{name}.weight")
            if part is not None:
                if part.start % FP8_BLOCK or (part.stop % FP8_BLOCK and part.stop != tensors.shape(key)[part.dim]):
                    where = "rows" if part.dim == 0 else "columns"
                    raise CheckpointError(
                        f"{tensors.directory}: this rank's {where} {part.start}:{part.stop} of {key} cut its "
                        f"{FP8_BLOCK}x{FP8_BLOCK} FP8 scale blocks, so it cannot stay FP8 split over these ranks; use "
                        "--fp8-weights dequantise (or a number of ranks that splits it on block boundaries)")
                parts[f"{name}.weight_scale_inv"] = part.in_blocks(FP8_BLOCK)
            module.keep_fp8_()
        elif isinstance(module, Experts):
            first = parts[f"{name}.gate_proj"].start if f"{name}.gate_proj" in parts else 0
            if f"{checkpoint_name(name, n_layers)}.{first}.gate_proj.weight_scale_inv" not in tensors:
                continue
            for projection in Experts.PROJECTIONS:  # whole experts: their scales split as they do
                if f"{name}.{projection}" in parts:
                    parts[f"{name}.{projection}_scale_inv"] = parts[f"{name}.{projection}"]
            module.keep_fp8_()
    return parts


def _allocate(model: nn.Module, device: torch.device) -> None:
    """Give every meta parameter and buffer real, uninitialised storage, keeping tied weights tied.

    What `Module.to_empty` does, without its meta-tensor path that imports torch.fx (0.5 s of start-up).
    """
    fresh: dict[int, Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None:
                    continue
                if id(t) not in fresh:
                    empty = torch.empty(t.shape, dtype=t.dtype, device=device)
                    fresh[id(t)] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty
                table[name] = fresh[id(t)]


def _fill(model: Transformer, tensors: _TensorIndex, dtype: torch.dtype, parts: dict[str, Part]) -> None:
    """Copy every checkpoint tensor (or its part, for the parameters named in `parts`) into the model's freshly
    allocated parameters and buffers."""
    n_layers = len(model.layers)
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name, param in targets.items():  # shared tensors (tied heads) appear once
            part = parts.get(name)
            expert = _EXPERT.match(name)
            if expert:
                first = part.start if part is not None else 0  # a rank's experts are first, first + 1, ...
                for e in range(param.shape[0]):
                    _fill_one(param[e], tensors, _expert_key(expert, first + e, n_layers), model.args, dtype)
                continue
            key = checkpoint_name(name, n_layers)
            if name == "lm_head.weight" and key not in tensors and model.args.tie_word_embeddings:
                continue
            _fill_one(param, tensors, key, model.args, dtype, part)


def _fill_one(target: Tensor, tensors: _TensorIndex, key: str, args: ModelArgs, dtype: torch.dtype,
              part: Part | None = None) -> None:
    """Copy checkpoint tensor `key` (or its `part`) into `target`: as stored when `target` is FP8, else in `dtype`
    (FP8 dequantised)."""
    if target.dtype == FP8:
        source = tensors.get(key, part)
        if source.dtype != FP8:
            raise CheckpointError(f"{tensors.directory}: tensor {key} is {source.dtype}, not FP8, yet has FP8 scales")
    else:
        source = _read(tensors, key, args.fp8_block_size, dtype, part)
    if tuple(source.shape) != tuple(target.shape):
        raise CheckpointError(
            f"{tensors.directory}: tensor {key} has shape {list(source.shape)}, expected {list(target.shape)}"
        )
    target.copy_(source)
