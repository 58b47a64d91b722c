"""Plain-torch references for duet's kernels.

Every function here has exactly the signature of its Triton counterpart in
:mod:`duet.kernels.triton_kernels` and of the public dispatcher in :mod:`duet.kernels`.  They are the
implementation used on CPUs (and with ``DUET_KERNELS=torch``) and the ground truth the Triton kernels
are tested against, so they favour clarity and fp32 math over speed, but none of them does wasteful
work (no dense evaluation of every expert, no attention over padding beyond the longest row).

Conventions follow DeepSeek-V3's inference ``kernel.py``: weights are ``[out, in]``; FP8 is
``float8_e4m3fn`` (largest finite value 448); scales are float32, one per ``block_size`` group of an
activation row and one per ``block_size x block_size`` tile of a weight, and ``value ~= fp8 * scale``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# A group of all zeros gets this amax instead of 0, so its scale stays positive and y = x / s is 0, not NaN.
AMAX_EPS = 1e-12

__all__ = ["act_quant", "weight_dequant", "fp8_gemm", "fused_moe", "mla_decode", "moe_align"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------- FP8


def act_quant(x: Tensor, block_size: int = 128) -> tuple[Tensor, Tensor]:
    """Per-token, per-``block_size``-channel-group FP8 (e4m3) quantisation.

    ``x [..., K]`` (K need not be a multiple of ``block_size``) ->
    ``(y float8_e4m3fn [..., K], s float32 [..., ceil(K / block_size)])`` with ``x ~= y * s`` per group,
    ``s = max(amax, 1e-12) / 448``.
    """
    K = x.shape[-1]
    G = _cdiv(K, block_size)
    xf = x.float()
    pad = G * block_size - K
    if pad:
        xf = F.pad(xf, (0, pad))
    xg = xf.reshape(*x.shape[:-1], G, block_size)
    amax = xg.abs().amax(dim=-1).clamp_min(AMAX_EPS)
    s = amax / FP8_MAX
    y = (xg / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX)
    y = y.reshape(*x.shape[:-1], G * block_size)[..., :K].to(FP8_DTYPE)
    return y.contiguous(), s


def _expand_block_scale(s: Tensor, M: int, N: int, block_size: int) -> Tensor:
    """``[ceil(M/b), ceil(N/b)]`` block scales -> per-element ``[M, N]``."""
    return s.repeat_interleave(block_size, dim=0)[:M].repeat_interleave(block_size, dim=1)[:, :N]


def weight_dequant(
    w: Tensor, scale_inv: Tensor, block_size: int = 128, dtype: torch.dtype = torch.float32
) -> Tensor:
    """FP8 block-scaled weight ``w [M, N]`` with ``scale_inv float32 [ceil(M/b), ceil(N/b)]`` ->
    ``w * scale`` (one scale per ``block_size x block_size`` tile) as ``dtype [M, N]``.

    (``scale_inv`` is the checkpoint's name: it is the factor that undoes the quantisation.)
    """
    if w.dim() != 2:
        raise ValueError(f"weight_dequant expects a 2-D weight, got shape {tuple(w.shape)}")
    M, N = w.shape
    expected = (_cdiv(M, block_size), _cdiv(N, block_size))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_dequant: scale_inv shape {tuple(scale_inv.shape)} does not match {expected} "
            f"for a [{M}, {N}] weight with block_size={block_size}"
        )
    out = w.float() * _expand_block_scale(scale_inv.float(), M, N, block_size)
    return out.to(dtype)


def _dequant_act(a: Tensor, a_s: Tensor, block_size: int) -> Tensor:
    K = a.shape[-1]
    return a.float() * a_s.float().repeat_interleave(block_size, dim=-1)[..., :K]


def fp8_gemm(
    a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Block-scaled FP8 GEMM: ``a fp8 [..., K]`` with ``a_s [..., ceil(K/128)]`` (from :func:`act_quant`),
    ``b fp8 [N, K]`` with ``b_s [ceil(N/128), ceil(K/128)]`` -> ``a @ b.T`` as ``out_dtype [..., N]``,
    computed in fp32 (dequantise both operands, then an fp32 matmul)."""
    block_size = 128
    N, K = b.shape
    if a.shape[-1] != K:
        raise ValueError(f"fp8_gemm: a has K={a.shape[-1]} but b is {tuple(b.shape)}")
    af = _dequant_act(a, a_s, block_size)
    bf = weight_dequant(b, b_s, block_size, torch.float32)
    return (af @ bf.T).to(out_dtype)


# --------------------------------------------------------------------------------------------- MoE


def moe_align(topk_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sort the ``T * k`` (token, slot) assignments by expert and pad each expert's run to ``block_m``.

    Returns ``(sorted_ids, block_expert, counts)``: ``sorted_ids [num_blocks * block_m]`` int32 holds
    flat assignment indices ``t * k + j`` grouped by expert (padding slots hold ``T * k``, an
    out-of-range sentinel), ``block_expert [num_blocks]`` int32 the expert of each ``block_m`` block,
    ``counts [num_experts]`` the number of assignments per expert. Experts with no tokens get no block.
    This is vLLM's ``moe_align_block_size`` done with torch ops (a handful of small launches, no sync).
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    device = flat.device
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    # The padded total is bounded by n + E * (block_m - 1); use that static bound so no host sync is needed.
    max_blocks = _cdiv(n, block_m) + num_experts
    padded_start = torch.cumsum(padded, 0) - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    sorted_expert = flat[order]
    rank = torch.arange(n, device=device) - start[sorted_expert]
    dest = padded_start[sorted_expert] + rank
    sorted_ids = torch.full((max_blocks * block_m,), n, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    # Expert of each block: the number of padded expert ends at or before the block's first row.
    block_start = torch.arange(max_blocks, device=device) * block_m
    padded_end = torch.cumsum(padded, 0)
    block_expert = torch.searchsorted(padded_end, block_start, right=True).to(torch.int32)
    # Blocks past the last expert's padding get -1 so kernels can exit early.
    block_expert = torch.where(block_expert >= num_experts, -1, block_expert).to(torch.int32)
    return sorted_ids, block_expert, counts


def fused_moe(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, topk_ids: Tensor, topk_weights: Tensor,
    *, dense: bool = False,
) -> Tensor:
    """Routed SwiGLU experts.

    ``x [T, D]``; ``w_gate, w_up [E, I, D]``; ``w_down [E, D, I]``; ``topk_ids [T, k]`` int;
    ``topk_weights [T, k]`` float. Returns ``[T, D]`` (x's dtype)
    ``= sum_j topk_weights[t, j] * w_down[e] @ (silu(w_gate[e] @ x[t]) * (w_up[e] @ x[t]))``,
    ``e = topk_ids[t, j]``.

    Tokens are grouped by expert (stable sort of the flat assignments), each expert that received
    tokens runs on its contiguous slice, and results are scatter-added back in fp32.  The gate/up
    matmuls run in the weights' dtype (fp32 accumulation on GPUs), SiLU*up in fp32, the hidden
    activation is rounded to x's dtype before the down projection, as in the Triton kernel.

    ``dense=True``: no host sync and shapes that do not depend on the routing, which is what
    ``torch.compile`` needs (a compiled decode step): the chosen experts' weights gathered per token for a
    few tokens, every expert weighed by a ``[T, E]`` routing matrix for more (see ``_fused_moe_dense``).
    Equal within fp32 noise.
    """
    if dense:
        return _fused_moe_dense(x, w_gate, w_up, w_down, topk_ids, topk_weights)
    T, D = x.shape
    k = topk_ids.shape[1]
    if T * k <= w_gate.shape[0]:
        # a few tokens (decoding, drafts): each (token, expert) pair on its own; grouping them would cost
        # more small ops than it saves
        out = torch.zeros(T, D, dtype=torch.float32, device=x.device)
        for t, (experts, weights) in enumerate(zip(topk_ids.tolist(), topk_weights.float().tolist(), strict=True)):
            xt = x[t : t + 1]
            for e, w in zip(experts, weights, strict=True):
                h = (F.silu(F.linear(xt, w_gate[e]).float()) * F.linear(xt, w_up[e]).float()).to(x.dtype)
                out[t : t + 1] += F.linear(h, w_down[e]).float() * w
        return out.to(x.dtype)
    flat = topk_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w_gate.shape[0]).tolist()
    token_of = order // k
    weight_of = topk_weights.reshape(-1)[order].float()
    out = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        sl = slice(start, start + c)
        start += c
        xs = x[token_of[sl]]
        g = (xs @ w_gate[e].T).float()
        u = (xs @ w_up[e].T).float()
        h = (F.silu(g) * u).to(x.dtype)
        y = (h @ w_down[e].T).float() * weight_of[sl, None]
        out.index_add_(0, token_of[sl], y)
    return out.to(x.dtype)


def _fused_moe_dense(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, topk_ids: Tensor, topk_weights: Tensor
) -> Tensor:
    """:func:`fused_moe` with shapes that do not depend on the routing: x [T, D] -> [T, D], same rounding points.

    Few tokens (T * k <= E: decoding a few rows): each token's k experts' weights
    are gathered into [T*k, ...] stacks and applied with batched matmuls, so only the chosen experts'
    weights are read (a small model's step is bound by reading its weights). More tokens: every expert
    runs on every token, weighed by a [T, E] routing matrix that is zero for unchosen experts.
    """
    T, k = topk_ids.shape
    # With a symbolic row count this guards the graph to the row counts on this side of the bound: a
    # second graph serves the others. (Deciding without a guard, by `statically_known_true`, made the
    # compiled steps 2-3x slower in a same-session A/B, for reasons not yet understood.)
    if T * k <= w_gate.shape[0]:
        flat = topk_ids.reshape(-1).to(torch.int64)
        xs = x.repeat_interleave(k, dim=0)[:, None, :]  # [T*k, 1, D]
        g = torch.bmm(xs, w_gate[flat].transpose(1, 2)).float()
        u = torch.bmm(xs, w_up[flat].transpose(1, 2)).float()
        h = (F.silu(g) * u).to(x.dtype)  # [T*k, 1, I]
        y = torch.bmm(h, w_down[flat].transpose(1, 2)).float().view(T, k, -1)  # [T, k, D]
        return (y * topk_weights.float()[..., None]).sum(dim=1).to(x.dtype)
    route = torch.zeros(T, w_gate.shape[0], dtype=torch.float32, device=x.device)
    route = route.scatter_add(1, topk_ids.to(torch.int64), topk_weights.float())  # [T, E]
    g = torch.einsum("td,eid->tei", x, w_gate).float()
    u = torch.einsum("td,eid->tei", x, w_up).float()
    h = (F.silu(g) * u).to(x.dtype)  # [T, E, I]
    y = torch.einsum("tei,edi->ted", h, w_down).float()  # [T, E, D]
    return torch.einsum("ted,te->td", y, route).to(x.dtype)


# --------------------------------------------------------------------------------------------- MLA


def mla_decode(
    q_latent: Tensor, q_pe: Tensor, kv_latent: Tensor, k_pe: Tensor, lengths: Tensor, softmax_scale: float,
    *, trim: bool = True,
) -> Tensor:
    """Absorbed MLA attention for the newest ``S`` tokens of each row.

    ``q_latent [B, S, H, R]`` (queries already in latent space), ``q_pe [B, S, H, P]``,
    ``kv_latent [B, T, R]``, ``k_pe [B, T, P]``, ``lengths [B]`` = valid cache length per row including
    the S new tokens. Query ``s`` of row ``b`` sits at ``p = lengths[b] - S + s`` and attends to cache
    positions ``0..p``; positions ``>= lengths[b]`` are padding and never read into the result (even if
    they hold NaN). ``scores = (q_latent . kv_latent + q_pe . k_pe) * softmax_scale``, softmax in fp32,
    returns ``softmax @ kv_latent`` as ``[B, S, H, R]`` in q_latent's dtype.

    ``trim`` reads ``lengths`` on the host to skip the positions past the longest row and the mask when
    no row needs one; ``trim=False`` always attends over all T positions with the mask (no host sync,
    shapes that do not depend on the lengths: what ``torch.compile`` needs).
    """
    B, S, H, R = q_latent.shape
    lengths = lengths.to(device=q_latent.device, dtype=torch.int64)
    if trim:
        t_max = max(int(lengths.max().item()), 1) if B else 1
        t_max = min(t_max, kv_latent.shape[1])
        ragged = bool((lengths != t_max).any())
    else:
        t_max, ragged = kv_latent.shape[1], True
    kv, kp = kv_latent[:, :t_max].float(), k_pe[:, :t_max].float()
    pos = torch.arange(t_max, device=q_latent.device)
    if ragged and trim:  # rows shorter than the longest: zero their padding so that NaN there cannot leak
        # row by row on a copy (the lengths are on the host already): a broadcast masked_fill over [B, T, R]
        # took 15x as long and was most of a batched decoding step's attention on a CPU
        kv, kp = kv.clone(), kp.clone()
        for b, n in enumerate(lengths.tolist()):
            if n < t_max:
                kv[b, max(n, 0):] = 0.0
                kp[b, max(n, 0):] = 0.0
    elif ragged:  # no host sync: the same by a mask
        valid_kv = pos[None, :] < lengths[:, None]  # [B, T]
        kv = kv.masked_fill(~valid_kv[..., None], 0.0)
        kp = kp.masked_fill(~valid_kv[..., None], 0.0)
    # scores [B, S*H, T] = (q_latent . kv + q_pe . k_pe) * scale, as two batched matmuls
    scores = torch.baddbmm(q_pe.reshape(B, S * H, -1).float() @ kp.transpose(1, 2),
                           q_latent.reshape(B, S * H, R).float(), kv.transpose(1, 2),
                           beta=softmax_scale, alpha=softmax_scale).view(B, S, H, t_max)
    if ragged or S > 1:  # with one new token per full row every position is visible: no mask needed
        q_pos = lengths[:, None] - S + torch.arange(S, device=q_latent.device)[None, :]  # [B, S]
        allowed = pos[None, None, :] <= q_pos[:, :, None]  # [B, S, T]
        # an additive mask: a broadcast masked_fill over the heads is several times slower on a CPU
        bias = torch.zeros(allowed.shape, device=scores.device).masked_fill_(~allowed, float("-inf"))
        scores = scores + bias[:, :, None, :]
    p = torch.softmax(scores, dim=-1)
    out = (p.view(B, S * H, t_max) @ kv).view(B, S, H, R)
    return out.to(q_latent.dtype)
