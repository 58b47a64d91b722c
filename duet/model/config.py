"""Model arguments of a DeepSeek-V3-family checkpoint, read from its `config.json`.

One dataclass holds every hyper-parameter the model needs. `ModelArgs.from_hf_config` accepts the
fields of `DeepseekV3ForCausalLM` (and `DeepseekV2ForCausalLM` where its fields allow) as written
by DeepSeek's releases and by transformers (which moves `rope_theta`/`rope_scaling` into
`rope_parameters`), and fails with a one-line `ConfigError` naming the field for anything the
runtime does not support.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from duet.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")
SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


@dataclass
class ModelArgs:
    """Hyper-parameters of the model. Defaults are DeepSeek-V3's (671B)."""

    architecture: str = "DeepseekV3ForCausalLM"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048  # each routed and shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # Mixture of experts
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    # Multi-head latent attention
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # Rotary embedding (YaRN when rope_scaling is set)
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # Multi-token prediction modules stored after the last main layer
    num_nextn_predict_layers: int = 0
    # FP8 block quantisation of the stored weights: None or the block size (e.g. 128)
    fp8_block_size: int | None = None
    # Token ids, kept for saving and generation
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived quantities
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        """DeepSeek's rule: dense for the first `first_k_dense_replace` layers, then MoE every `moe_layer_freq`."""
        return (
            self.n_routed_experts > 0
            and layer_id >= self.first_k_dense_replace
            and layer_id % self.moe_layer_freq == 0
        )

    @property
    def yarn_factor(self) -> float:
        return float(self.rope_scaling["factor"]) if self.rope_scaling else 1.0

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale_all_dim^2 under YaRN (the attention temperature fix)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling and self.rope_scaling.get("mscale_all_dim"):
            m = yarn_mscale(self.yarn_factor, float(self.rope_scaling["mscale_all_dim"]))
            scale *= m * m
        return scale

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Build from a checkpoint's config.json dict; raises ConfigError naming a bad field."""
        archs = cfg.get("architectures") or []
        by_model_type = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
        arch = archs[0] if archs else by_model_type.get(cfg.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"config.json: architectures={archs or cfg.get('model_type')!r} is not supported "
                f"(duet runs {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        v2 = arch == "DeepseekV2ForCausalLM"
        get = _FieldReader(cfg)
        rope_theta, rope_scaling = _read_rope(cfg)
        n_routed = get.int("n_routed_experts", 0) or 0
        args = cls(
            architecture=arch,
            vocab_size=get.int("vocab_size"),
            hidden_size=get.int("hidden_size"),
            intermediate_size=get.int("intermediate_size"),
            moe_intermediate_size=get.int("moe_intermediate_size", 0) if n_routed else 0,
            num_hidden_layers=get.int("num_hidden_layers"),
            num_attention_heads=get.int("num_attention_heads"),
            n_shared_experts=get.int("n_shared_experts", 0) or 0,
            n_routed_experts=n_routed,
            num_experts_per_tok=get.int("num_experts_per_tok", 0) or 0,
            n_group=get.int("n_group", 1) or 1,
            topk_group=get.int("topk_group", 1) or 1,
            topk_method=get.str("topk_method", "greedy" if v2 else "noaux_tc"),
            scoring_func=get.str("scoring_func", "softmax" if v2 else "sigmoid"),
            norm_topk_prob=get.bool("norm_topk_prob", not v2),
            routed_scaling_factor=get.float("routed_scaling_factor", 1.0),
            first_k_dense_replace=get.int("first_k_dense_replace", 0) or 0,
            moe_layer_freq=get.int("moe_layer_freq", 1) or 1,
            q_lora_rank=get.int("q_lora_rank", None),
            kv_lora_rank=get.int("kv_lora_rank"),
            qk_nope_head_dim=get.int("qk_nope_head_dim"),
            qk_rope_head_dim=get.int("qk_rope_head_dim"),
            v_head_dim=get.int("v_head_dim"),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rope_interleave=get.bool("rope_interleave", True),
            max_position_embeddings=get.int("max_position_embeddings", 4096),
            rms_norm_eps=get.float("rms_norm_eps", 1e-6),
            tie_word_embeddings=get.bool("tie_word_embeddings", False),
            num_nextn_predict_layers=get.int("num_nextn_predict_layers", 0) or 0,
            fp8_block_size=_read_quantization(cfg.get("quantization_config")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config.json: hidden_act={act!r} is not supported (only 'silu')")
        if cfg.get("attention_bias"):
            raise ConfigError("config.json: attention_bias=true is not supported (DeepSeek-V3 has none)")
        args.validate()
        return args

    def validate(self) -> None:
        """Check consistency; raises ConfigError naming the first bad field."""
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json: {name}={getattr(self, name)} must be positive")
        if self.qk_nope_head_dim < 0:
            raise ConfigError(f"config.json: qk_nope_head_dim={self.qk_nope_head_dim} must be >= 0")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"config.json: qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"config.json: q_lora_rank={self.q_lora_rank} must be positive or null")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"config.json: scoring_func={self.scoring_func!r} is not supported {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(f"config.json: topk_method={self.topk_method!r} is not supported {TOPK_METHODS}")
        if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
            raise ConfigError("config.json: topk_method='noaux_tc' needs scoring_func='sigmoid'")
        if self.moe_layer_freq < 1:
            raise ConfigError(f"config.json: moe_layer_freq={self.moe_layer_freq} must be >= 1")
        if self.n_routed_experts:
            if self.moe_intermediate_size <= 0:
                raise ConfigError("config.json: moe_intermediate_size must be positive when n_routed_experts > 0")
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise ConfigError(
                    f"config.json: num_experts_per_tok={self.num_experts_per_tok} must be in "
                    f"1..n_routed_experts ({self.n_routed_experts})"
                )
            if self.n_routed_experts % self.n_group:
                raise ConfigError(
                    f"config.json: n_group={self.n_group} must divide n_routed_experts={self.n_routed_experts}"
                )
            if not 0 < self.topk_group <= self.n_group:
                raise ConfigError(f"config.json: topk_group={self.topk_group} must be in 1..n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
                raise ConfigError(
                    f"config.json: n_group={self.n_group} leaves {per_group} expert per group; "
                    "noaux_tc group scores need at least 2"
                )
            if self.topk_group * per_group < self.num_experts_per_tok:
                raise ConfigError(
                    f"config.json: topk_group={self.topk_group} groups of {per_group} experts cannot hold "
                    f"num_experts_per_tok={self.num_experts_per_tok}"
                )

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json that transformers' DeepseekV3ForCausalLM (or V2) reads back."""
        v2 = self.architecture == "DeepseekV2ForCausalLM"
        cfg: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": "deepseek_v2" if v2 else "deepseek_v3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "n_shared_experts": self.n_shared_experts,
            "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "topk_method": self.topk_method,
            "scoring_func": self.scoring_func,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "first_k_dense_replace": self.first_k_dense_replace,
            "moe_layer_freq": self.moe_layer_freq,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "head_dim": self.qk_rope_head_dim,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_interleave": self.rope_interleave,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "hidden_act": "silu",
            "attention_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }
        if self.fp8_block_size:
            cfg["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [self.fp8_block_size, self.fp8_block_size],
            }
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature factor 0.1 * mscale * ln(scale) + 1 (1 when not scaled)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class _FieldReader:
    """Typed access to config.json fields with errors that name the field."""

    _MISSING = object()

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg

    def _get(self, name: str, default: Any) -> Any:
        value = self.cfg.get(name, default)
        if value is self._MISSING:
            raise ConfigError(f"config.json: required field {name!r} is missing")
        return value

    def int(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config.json: {name}={value!r} must be an integer")
        return value

    def float(self, name: str, default: Any = _MISSING) -> float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config.json: {name}={value!r} must be a number")
        return float(value)

    def bool(self, name: str, default: Any = _MISSING) -> bool:
        value = self._get(name, default)
        if value is None:
            return bool(default)
        if not isinstance(value, bool):
            raise ConfigError(f"config.json: {name}={value!r} must be true or false")
        return value

    def str(self, name: str, default: Any = _MISSING) -> str:
        value = self._get(name, default)
        if not isinstance(value, str):
            raise ConfigError(f"config.json: {name}={value!r} must be a string")
        return value


_YARN_KEYS = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}


def _read_rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the YaRN parameters, from either `rope_scaling` (DeepSeek) or `rope_parameters` (transformers)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None and params:
        scaling = params
    if not scaling:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise ConfigError(f"config.json: rope_scaling={scaling!r} must be an object or null")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return float(theta), None
    if kind != "yarn":
        raise ConfigError(f"config.json: rope_scaling type {kind!r} is not supported (only 'yarn')")
    yarn = {k: scaling[k] for k in _YARN_KEYS if scaling.get(k) is not None}
    if "factor" not in yarn or "original_max_position_embeddings" not in yarn:
        raise ConfigError("config.json: rope_scaling (yarn) needs 'factor' and 'original_max_position_embeddings'")
    yarn.setdefault("beta_fast", 32)
    yarn.setdefault("beta_slow", 1)
    yarn.setdefault("mscale", 1.0)
    yarn.setdefault("mscale_all_dim", 0.0)
    return float(theta), {"type": "yarn", **yarn}


def _read_quantization(qc: Any) -> int | None:
    """The FP8 block size of a quantised checkpoint, or None when weights are stored unquantised."""
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise ConfigError(f"config.json: quantization_config={qc!r} must be an object")
    method = qc.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"config.json: quantization_config.quant_method={method!r} is not supported (only 'fp8')")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"config.json: quantization_config.fmt={fmt!r} is not supported (only 'e4m3')")
    block = qc.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and block[0] == block[1] and isinstance(block[0], int)):
        raise ConfigError(
            f"config.json: quantization_config.weight_block_size={block!r} is not supported (square blocks only)"
        )
    return block[0]
