"""The DeepSeek-V3 architecture: MLA attention, DeepSeekMoE, and Multi-Token Prediction.

One class per concept, top to bottom: RMSNorm, rotary embedding (with YaRN), MLA, MLP, Gate,
MoE, Block, MTPLayer, Transformer. Module and parameter names follow the Hugging Face layout
(`layers.3.self_attn.kv_b_proj.weight`), so checkpoints map onto the model with no renaming
except the routed experts, which are stacked into `[n_experts, ...]` tensors for grouped
computation (see `duet.model.checkpoint`).

The projections of attention, MLPs and experts hold either a plain weight or, loaded from an FP8 checkpoint and
kept FP8 (`Linear.keep_fp8_`), float8_e4m3 weights with a float32 scale per 128x128 block, multiplied by
`kernels.act_quant` + `kernels.fp8_gemm`, as DeepSeek's inference code does.

Shapes: B batch, S new tokens, T cached tokens, D hidden, H heads, R kv_lora_rank,
P qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim, E routed experts, k experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from duet import kernels
from duet.model.config import ModelArgs, yarn_mscale


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, as DeepSeek and transformers do."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


# ----------------------------------------------------------------------------- linear layers

FP8 = torch.float8_e4m3fn
FP8_BLOCK = 128  # the block of DeepSeek's FP8 checkpoints, and the only one fp8_gemm takes


def linear(x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
    """x [..., in] @ weight [out, in].T -> [..., out] in x's dtype.

    With `scale` [ceil(out/128), ceil(in/128)] the weight is FP8: x is quantised to FP8 per token and 128 channels
    and the block-scaled FP8 GEMM accumulates in fp32 (Triton on CUDA with compute capability 8.9+, elsewhere the
    reference, which dequantises both operands block by block).
    """
    if scale is None:
        return F.linear(x, weight)
    x_fp8, x_scale = kernels.act_quant(x, FP8_BLOCK)
    return kernels.fp8_gemm(x_fp8, x_scale, weight, scale, out_dtype=x.dtype)


def _empty_fp8(weight: Tensor) -> tuple[nn.Parameter, Tensor]:
    """An empty FP8 weight shaped as `weight` [..., out, in], on its device, and its empty float32 block scales
    [..., ceil(out/128), ceil(in/128)]. No gradients through FP8 weights."""
    *stack, rows, cols = weight.shape
    scale = torch.empty(*stack, -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK), dtype=torch.float32, device=weight.device)
    return nn.Parameter(torch.empty(weight.shape, dtype=FP8, device=weight.device), requires_grad=False), scale


class Linear(nn.Module):
    """A bias-free linear layer, y = x W^T, whose weight W [out, in] is plain (the model's dtype) or FP8.

    FP8: `weight` float8_e4m3fn [out, in] and `weight_scale_inv` float32 [ceil(out/128), ceil(in/128)] (the
    checkpoint's names), W = weight * scale per 128x128 block. `forward` picks the path from the weight it holds.
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self.register_buffer("weight_scale_inv", None)  # None: a plain weight (and nothing in the state dict)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]."""
        return linear(x, self.weight, self.weight_scale_inv)

    def full_weight(self, dtype: torch.dtype) -> Tensor:
        """W [out, in]: the plain weight as it is, or the FP8 one dequantised to `dtype` (for the absorbed attention,
        which multiplies by W's slices per head, as DeepSeek's inference code does)."""
        if self.weight_scale_inv is None:
            return self.weight
        return kernels.weight_dequant(self.weight, self.weight_scale_inv, FP8_BLOCK, dtype)

    def keep_fp8_(self) -> None:
        """Hold the weight as FP8 with its block scales: empty tensors of those dtypes on the weight's device (the
        meta device, where the loader calls it before filling them from the checkpoint)."""
        self.weight, self.weight_scale_inv = _empty_fp8(self.weight)


# ----------------------------------------------------------------------------- rotary embedding


def rope_inv_freq(args: ModelArgs) -> tuple[Tensor, float]:
    """Inverse frequencies [P/2] of the rotary embedding and the factor applied to cos/sin.

    With YaRN (`rope_scaling`), frequencies below the `beta_slow..beta_fast` correction range are
    interpolated by `factor`, those above are kept, and a linear ramp blends the two.
    """
    dim, base = args.qk_rope_head_dim, args.rope_theta
    # Always on the CPU: the model may be built under `torch.device("meta")`.
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if not args.rope_scaling:
        return freqs, 1.0
    s = args.rope_scaling
    factor, original = float(s["factor"]), s["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(s["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(s["beta_slow"])), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    freqs = freqs / factor * ramp + freqs * (1 - ramp)
    attention_factor = yarn_mscale(factor, float(s["mscale"])) / yarn_mscale(factor, float(s["mscale_all_dim"]))
    return freqs, attention_factor


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleave: bool) -> Tensor:
    """Rotate x [B, S, H, P] by angles given as cos, sin [B, S, P/2].

    `interleave` (DeepSeek's layout) rotates adjacent pairs (x0, x1), (x2, x3), ... and returns the
    rotated evens then the rotated odds, which is transformers' convention; attention only sees
    dot products, so any fixed permutation shared by queries and keys is equivalent.
    """
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ----------------------------------------------------------------------------- latent KV cache


class KVCache:
    """Preallocated latent cache of absorbed MLA, for every main and MTP layer.

    Per layer and token it stores only the normalised KV latent [R] and the rotary key [P] shared
    by all heads, instead of H full keys and values: (R + P) numbers per token instead of
    H * (N + P + V). Rows are independent sequences; `lengths[b]` is how many positions of row b
    hold valid entries. Rolling back rejected draft tokens is just lowering `lengths`.
    """

    def __init__(self, args: ModelArgs, n_layers: int, batch_size: int, max_seq_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.max_seq_len = max_seq_len
        self.kv = torch.zeros(n_layers, batch_size, max_seq_len, args.kv_lora_rank, device=device, dtype=dtype)
        self.pe = torch.zeros(n_layers, batch_size, max_seq_len, args.qk_rope_head_dim, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @classmethod
    def over(cls, kv: Tensor, pe: Tensor) -> KVCache:
        """A cache over existing latent tensors kv [L, B, T, R], pe [L, B, T, P] (e.g. views of some rows and
        positions of another cache), sharing their memory: what a compiled decode step is given."""
        cache = cls.__new__(cls)
        cache.max_seq_len, cache.kv, cache.pe = kv.shape[2], kv, pe
        cache.lengths = torch.zeros(kv.shape[1], dtype=torch.long, device=kv.device)
        return cache

    @property
    def batch_size(self) -> int:
        return self.kv.shape[1]

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + self.pe.numel() * self.pe.element_size()


@dataclass
class CacheView:
    """What one forward pass needs from the cache: which layer block, which rows, where to write."""

    cache: KVCache
    rows: slice  # the batch rows of the cache this forward pass covers
    start_pos: Tensor  # [B] position of the first new token of each row
    fresh: bool = False  # every row starts at position 0 (a prompt's prefill): no cached prefix to attend to
    # Compile-friendly (no host sync, shapes independent of the positions): attention reads every position
    # of the cache rows and masks by position, instead of trimming them to the longest row.
    static: bool = False
    _where: tuple | None = field(default=None, repr=False)  # write indices, shared by every layer of a pass

    def write_and_read(self, layer: int, kv: Tensor, pe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store the new latents kv [B, S, R], pe [B, S, P] of `layer` (MTP layers follow the main ones);
        return that layer's row caches [B, T, R], [B, T, P] (up to the longest row unless static: all T
        positions), and each row's valid length [B]."""
        cache_kv, cache_pe = self.cache.kv[layer, self.rows], self.cache.pe[layer, self.rows]
        b, s = kv.shape[:2]
        if self._where is None or self._where[1].shape != (b, s):
            batch_idx = torch.arange(b, device=kv.device)[:, None]
            pos = self.start_pos[:, None] + torch.arange(s, device=kv.device)
            lengths = self.start_pos + s
            self._where = (batch_idx, pos, lengths, None if self.static else int(lengths.max()))
        batch_idx, pos, lengths, t = self._where
        cache_kv[batch_idx, pos] = kv.to(cache_kv.dtype)
        cache_pe[batch_idx, pos] = pe.to(cache_pe.dtype)
        return cache_kv[:, :t], cache_pe[:, :t], lengths


# ----------------------------------------------------------------------------- attention


class MLA(nn.Module):
    """Multi-head Latent Attention.

    Queries go through a low-rank bottleneck (q_a_proj -> norm -> q_b_proj, or one q_proj when
    q_lora_rank is null). Keys and values are compressed into one latent c [R] per token plus a
    rotary key k_pe [P] shared by all heads (kv_a_proj_with_mqa); kv_b_proj expands c into the
    per-head no-rope key [N] and value [V].

    Two equivalent paths:
    - naive (no cache, e.g. training and prefill): expand K and V per head, standard attention;
    - absorbed (decoding with a latent cache): fold kv_b_proj's key half into the query and its
      value half into the output, so attention runs directly over the cached latents.
    """

    def __init__(self, args: ModelArgs, dtype: torch.dtype | None = None):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_rank = args.kv_lora_rank
        self.interleave = args.rope_interleave
        self.softmax_scale = args.softmax_scale
        qk_dim = self.nope_dim + self.rope_dim
        d = args.hidden_size
        if args.q_lora_rank is None:
            self.q_proj = Linear(d, self.n_heads * qk_dim, dtype)
        else:
            self.q_a_proj = Linear(d, args.q_lora_rank, dtype)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, args.rms_norm_eps, dtype)
            self.q_b_proj = Linear(args.q_lora_rank, self.n_heads * qk_dim, dtype)
        self.kv_a_proj_with_mqa = Linear(d, self.kv_rank + self.rope_dim, dtype)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, args.rms_norm_eps, dtype)
        self.kv_b_proj = Linear(self.kv_rank, self.n_heads * (self.nope_dim + self.v_dim), dtype)
        self.o_proj = Linear(self.n_heads * self.v_dim, d, dtype)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layer: int, cache: CacheView | None = None) -> Tensor:
        """x [B, S, D], cos/sin [B, S, P/2] -> [B, S, D]. With a cache, attends to the cached prefix too."""
        b, s, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)

        kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        kv = self.kv_a_layernorm(kv)  # [B, S, R]
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.interleave).squeeze(2)  # [B, S, P]

        if cache is None:
            out = self._naive(q_nope, q_pe, kv, k_pe)
        else:
            kv_all, pe_all, lengths = cache.write_and_read(layer, kv, k_pe)
            # a fresh prefill attends only to its own tokens: per-head causal attention (SDPA) is cheaper
            # than scoring S queries against the latents, which costs S x S x H fp32 scores at once
            out = (self._naive(q_nope, q_pe, kv, k_pe) if cache.fresh
                   else self._absorbed(q_nope, q_pe, kv_all, pe_all, lengths, trim=not cache.static))
        return self.o_proj(out.flatten(2))

    def _naive(self, q_nope: Tensor, q_pe: Tensor, kv: Tensor, k_pe: Tensor) -> Tensor:
        """Causal attention over the S given tokens with per-head keys and values -> [B, S, H, V]."""
        b, s = kv.shape[:2]
        kv = self.kv_b_proj(kv).view(b, s, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        # values padded to the query/key head size: SDPA's fused kernels want one head size, and without them it
        # falls back to materialising the S x S scores (4x slower for a 512-token prefill on a CPU)
        pad = q.shape[-1] - self.v_dim
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), F.pad(v, (0, pad)).transpose(1, 2) if pad > 0 else v.transpose(1, 2),
            is_causal=True, scale=self.softmax_scale,
        )
        return out.transpose(1, 2)[..., : self.v_dim]

    def _absorbed(self, q_nope: Tensor, q_pe: Tensor, kv: Tensor, k_pe: Tensor, lengths: Tensor,
                  trim: bool = True) -> Tensor:
        """Attention of the S new tokens over latents kv [B, T, R], k_pe [B, T, P] -> [B, S, H, V]
        (`trim=False`: no host sync, see `kernels.mla_decode`)."""
        w = self.kv_b_proj.full_weight(q_nope.dtype).view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]
        q_latent = torch.einsum("bshn,hnr->bshr", q_nope, w_uk)
        out_latent = kernels.mla_decode(q_latent, q_pe, kv, k_pe, lengths, self.softmax_scale, trim=trim)
        return torch.einsum("bshr,hvr->bshv", out_latent, w_uv)


# ----------------------------------------------------------------------------- feed-forward


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.gate_proj = Linear(dim, inter_dim, dtype)
        self.up_proj = Linear(dim, inter_dim, dtype)
        self.down_proj = Linear(inter_dim, dim, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Router: picks `num_experts_per_tok` experts per token and their weights.

    V3 (`noaux_tc`): sigmoid affinities; `e_score_correction_bias` is added for *choosing* experts
    only (auxiliary-loss-free balancing), never to their weights; experts are first limited to the
    `topk_group` best of `n_group` groups (group score = sum of its top-2 biased affinities); the
    chosen affinities are normalised among themselves and scaled by `routed_scaling_factor`.
    V2 (`greedy`, `group_limited_greedy`): softmax affinities, group score = the group's max.
    Routing is computed in fp32 whatever the model dtype.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k, self.n_groups, self.topk_groups = args.num_experts_per_tok, args.n_group, args.topk_group
        self.method, self.score_func = args.topk_method, args.scoring_func
        self.norm_topk, self.route_scale = args.norm_topk_prob, args.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size, dtype=torch.float32))
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, D] -> (weights [T, k] fp32, expert ids [T, k])."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_groups > 1 and self.method != "greedy":
            grouped = choice.view(x.shape[0], self.n_groups, -1)
            if self.method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_groups, dim=-1).indices
            mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, ids


class Experts(nn.Module):
    """The routed experts' SwiGLU weights stacked per expert, for grouped computation.

    gate_proj, up_proj: [E, I, D]; down_proj: [E, D, I] (checkpoints store one [out, in] matrix
    per expert; the loader stacks them). Kept FP8 (`keep_fp8_`): float8_e4m3fn weights with float32 block scales
    gate_proj_scale_inv, up_proj_scale_inv [E, ceil(I/128), ceil(D/128)], down_proj_scale_inv [E, ceil(D/128),
    ceil(I/128)].
    """

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, n_experts: int, dim: int, inter_dim: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim, dtype=dtype, device=device))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim, dtype=dtype, device=device))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim, dtype=dtype, device=device))
        for name in self.PROJECTIONS:
            self.register_buffer(f"{name}_scale_inv", None)

    def forward(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        """x [T, D], ids/weights [T, k] -> [T, D]; tokens are grouped by expert inside the kernel."""
        if self.gate_proj_scale_inv is None:
            return kernels.fused_moe(x, self.gate_proj, self.up_proj, self.down_proj, ids, weights.to(x.dtype))
        return self._fp8_experts(x, ids, weights)

    def _fp8_experts(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        """`forward` with FP8 weights: `fused_moe` takes no block scales, so each expert that received tokens runs
        its three FP8 GEMMs on them (as DeepSeek's inference code does), with fused_moe's rounding points."""
        k = ids.shape[1]
        flat = ids.flatten()
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            pairs = order[start:start + count]
            start += count
            tokens = pairs // k
            xs = x[tokens]
            h = F.silu(linear(xs, self.gate_proj[e], self.gate_proj_scale_inv[e]).float()) \
                * linear(xs, self.up_proj[e], self.up_proj_scale_inv[e]).float()
            y = linear(h.to(x.dtype), self.down_proj[e], self.down_proj_scale_inv[e]).float()
            out.index_add_(0, tokens, y * weights.flatten()[pairs, None].float())
        return out.to(x.dtype)

    def keep_fp8_(self) -> None:
        """Hold the experts' weights as FP8 with their block scales (see `Linear.keep_fp8_`)."""
        for name in self.PROJECTIONS:
            weight, scale = _empty_fp8(getattr(self, name))
            setattr(self, name, weight)
            setattr(self, f"{name}_scale_inv", scale)


class MoE(nn.Module):
    """DeepSeekMoE: routed experts chosen by the gate, plus always-on shared experts."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype | None = None):
        super().__init__()
        self.gate = Gate(args)
        self.experts = Experts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size, dtype)
        self.shared_experts = (
            MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts, dtype)
            if args.n_shared_experts else None
        )
        # Tokens routed to each expert in the last forward pass (read by training to balance load).
        self.last_expert_load: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        """x [B, S, D] -> [B, S, D]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x)
        if self.training:
            self.last_expert_load = torch.bincount(ids.flatten(), minlength=self.gate.weight.shape[0])
        y = self.experts(x, ids, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)


# ----------------------------------------------------------------------------- blocks


class Block(nn.Module):
    """Pre-norm transformer block: x + MLA(norm(x)), then h + FFN(norm(h)), FFN dense or MoE."""

    def __init__(self, args: ModelArgs, layer_id: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.self_attn = MLA(args, dtype)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        if args.is_moe_layer(layer_id):
            self.mlp: nn.Module = MoE(args, dtype)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size, dtype)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: CacheView | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, self.layer_id, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    """The MTP module's output: norm, then the output head (shared with the main model's lm_head)."""

    def __init__(self, args: ModelArgs, head: nn.Linear):
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, head.weight.dtype)
        self.head = head

    def forward(self, h: Tensor) -> Tensor:
        return self.head(self.norm(h))


class MTPLayer(Block):
    """One Multi-Token Prediction module (V3 paper, section 2.2).

    For position i it combines the previous depth's representation h_i (the main model's final,
    normed hidden state for depth 1) with the embedding of token i+1, runs one transformer block
    causally over the sequence, and predicts token i+2:
        h'_i = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)]);  h''_i = Block(h'_i);  logits = head(norm(h''_i))
    The concatenation order (embedding first) is the one of the released V3 weights (as read by
    vLLM and SGLang). The embedding and output head are shared with the main model.
    """

    def __init__(self, args: ModelArgs, layer_id: int, embed: nn.Embedding, head: nn.Linear,
                 dtype: torch.dtype | None = None):
        super().__init__(args, layer_id, dtype)
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.eh_proj = Linear(2 * args.hidden_size, args.hidden_size, dtype)
        self.shared_head = SharedHead(args, head)
        self._embed = [embed]  # a list, so the shared embedding is not registered twice

    def forward(self, h: Tensor, next_ids: Tensor, cos: Tensor, sin: Tensor,  # type: ignore[override]
                cache: CacheView | None = None) -> tuple[Tensor, Tensor]:
        """h [B, S, D] at positions i, next_ids [B, S] = tokens i+1 -> (logits [B, S, vocab] for i+2, h'' [B, S, D])."""
        e = self.enorm(self._embed[0](next_ids))
        x = self.eh_proj(torch.cat([e, self.hnorm(h)], dim=-1))
        x = super().forward(x, cos, sin, cache)
        return self.shared_head(x), x


class Transformer(nn.Module):
    """The causal LM: embeddings, `num_hidden_layers` blocks, final norm, lm_head, and MTP modules.

    `forward(input_ids)` is the plain public interface (logits for every position, no cache).
    The engine uses `hidden`, `logits` and `mtp_logits` with a `CacheView` for incremental decoding.
    """

    def __init__(self, args: ModelArgs, dtype: torch.dtype | None = None, n_mtp: int | None = None):
        super().__init__()
        self.args = args
        # nn.Embedding's own init is skipped on the meta device (checkpoint loading), where it would import
        # torch._dynamo: 1.5 s of every `duet solve` start-up
        weight = torch.empty(args.vocab_size, args.hidden_size, dtype=dtype)
        if not weight.is_meta:
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(Block(args, i, dtype) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False, dtype=dtype)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        n_mtp = args.num_nextn_predict_layers if n_mtp is None else n_mtp
        self.mtp = nn.ModuleList(
            MTPLayer(args, args.num_hidden_layers + k, self.embed_tokens, self.lm_head, dtype) for k in range(n_mtp)
        )
        inv_freq, self.rope_factor = rope_inv_freq(args)
        self._inv_freq = {inv_freq.device: inv_freq}

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> Transformer:
        """Random initialisation for training from scratch: N(0, std) matrices, unit norms, zero routing bias."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):  # every RMSNorm
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) * std)
        for _, buf in self.named_buffers():
            buf.zero_()
        return self

    def share_embedding_and_head(self, embed: nn.Module, head: nn.Module) -> None:
        """Use `embed` and `head` (e.g. their vocabulary-parallel forms, `duet.model.parallel`) in the main model
        and in every MTP module, which share them."""
        self.embed_tokens, self.lm_head = embed, head
        for module in self.mtp:
            module._embed[0] = embed
            module.shared_head.head = head

    @property
    def n_cache_layers(self) -> int:
        return len(self.layers) + len(self.mtp)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [B, S, P/2] for integer positions [B, S] (fp32 angles, as transformers computes them)."""
        dev = positions.device
        if dev not in self._inv_freq:
            self._inv_freq[dev] = next(iter(self._inv_freq.values())).to(dev)
        angles = positions[..., None].float() * self._inv_freq[dev]
        return (angles.cos() * self.rope_factor).to(dtype), (angles.sin() * self.rope_factor).to(dtype)

    def positions(self, input_ids: Tensor, cache: CacheView | None) -> Tensor:
        steps = torch.arange(input_ids.shape[1], device=input_ids.device)
        if cache is None:
            return steps.expand(input_ids.shape[0], -1)
        return cache.start_pos[:, None] + steps

    def hidden(self, input_ids: Tensor, cache: CacheView | None = None) -> Tensor:
        """input_ids [B, S] -> final normed hidden states [B, S, D]."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(self.positions(input_ids, cache), x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        return self.norm(x)

    def logits(self, h: Tensor) -> Tensor:
        return self.lm_head(h)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids [B, S] -> logits [B, S, vocab]."""
        return self.logits(self.hidden(input_ids))

    def mtp_logits(self, depth: int, h: Tensor, next_ids: Tensor,
                   cache: CacheView | None = None) -> tuple[Tensor, Tensor]:
        """Run MTP module `depth` (0-based) on h [B, S, D] and tokens next_ids [B, S] -> (logits, its hidden)."""
        module = self.mtp[depth]
        positions = self.positions(next_ids, cache)
        cos, sin = self.rope(positions, h.dtype)
        return module(h, next_ids, cos, sin, cache)
