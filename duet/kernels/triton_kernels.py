"""Triton implementations of duet's kernels (same signatures as :mod:`duet.kernels.reference`).

Importing this module imports Triton; :mod:`duet.kernels` does so lazily, only when a Triton kernel is
about to run.  Triton decides between compiling for the GPU and running its Python interpreter when
``@triton.jit`` decorates a function: for Triton's own library (``tl.max``, ``tl.sum``...) that is when
``triton`` is first imported, for the kernels below when this module is imported.  So
``TRITON_INTERPRET=1`` must be in the environment before the first ``import triton`` of the process;
:data:`INTERPRET` records the mode, and importing this module raises ImportError if the two disagree.

Running under ``TRITON_INTERPRET=1`` (how the CPU tests check these kernels) needs two workarounds,
because the interpreter (Triton 3.x) gets some conversions wrong that the GPU gets right:

* float32 -> float8_e4m3fn and float32 -> bfloat16 casts are not round-to-nearest-even there (bf16
  truncates; fp8 drops the mantissa carry into the exponent, e.g. 125.3 -> 64, and flushes subnormals).
  In interpreter mode outputs of those dtypes are written through an integer view of the output tensor
  with the bits computed in-kernel by an exact RNE encoder (:func:`_e4m3_bits`, :func:`_bf16_bits`).
* ``tl.dot`` on bfloat16 operands returns garbage there; in interpreter mode dot operands are widened
  to float32 first (exact for bf16 and fp8 inputs).

On a GPU neither workaround is used: the hardware conversions (``cvt.rn.satfinite``) and tensor-core
dots run as usual.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference as _ref

FP8_MAX = 448.0
AMAX_EPS = _ref.AMAX_EPS

# Output encodings for _store (constexpr OUT_KIND).
_NATIVE, _BF16_BITS, _E4M3_BITS = 0, 1, 2


# ----------------------------------------------------------------------------------------- helpers


@triton.jit
def _e4m3_bits(y):
    """float32 ``y`` already clamped to [-448, 448] -> float8_e4m3fn bit pattern (int32 in 0..255),
    rounded to nearest even, subnormals included."""
    bits = y.to(tl.uint32, bitcast=True)
    sign = ((bits >> 31) & 1).to(tl.int32)
    mag = bits & 0x7FFFFFFF
    # Normal range (|y| >= 2^-6): round the 23-bit mantissa to 3 bits (RNE, carry runs into the exponent),
    # then rebias the exponent from 127 to 7.
    normal = (((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)).to(tl.int32)
    # Subnormal range: the code is |y| / 2^-9 rounded to nearest even (8 means 2^-6, the smallest normal).
    a = tl.abs(y) * 512.0
    fl = a.to(tl.int32)
    frac = a - fl.to(tl.float32)
    up = (frac > 0.5) | ((frac == 0.5) & ((fl & 1) == 1))
    sub = fl + up.to(tl.int32)
    code = tl.where(mag < 0x3C800000, sub, normal)
    return code | (sign << 7)


@triton.jit
def _bf16_bits(x):
    """float32 -> bfloat16 bit pattern (int16), rounded to nearest even."""
    bits = x.to(tl.uint32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return r.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _store(ptr, val, mask, OUT_KIND: tl.constexpr):
    if OUT_KIND == 1:
        tl.store(ptr, _bf16_bits(val), mask=mask)
    elif OUT_KIND == 2:
        tl.store(ptr, _e4m3_bits(val).to(tl.uint8), mask=mask)
    else:
        tl.store(ptr, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


# Triton made its interpret-or-compile decision when it decorated the functions above.  Its own
# library functions (tl.max, tl.sum, ...) were decorated when triton.language was first imported; if
# TRITON_INTERPRET changed in between, kernels would fail deep inside Triton, so refuse here instead.
INTERPRET = type(_store).__name__ == "InterpretedFunction"
if INTERPRET != (type(tl.max).__name__ == "InterpretedFunction"):
    raise ImportError(
        "TRITON_INTERPRET changed after Triton was imported: set TRITON_INTERPRET=1 before the first "
        "`import triton` in this process (or run the interpreter in a fresh process)"
    )


def _out_arg(t: Tensor) -> tuple[Tensor, int]:
    """The tensor to hand a kernel as an output, and the OUT_KIND it must store with."""
    if INTERPRET:
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16), _BF16_BITS
        if t.dtype == torch.float8_e4m3fn:
            return t.view(torch.uint8), _E4M3_BITS
    return t, _NATIVE


def _check_device(*tensors: Tensor) -> None:
    if INTERPRET:
        return
    for t in tensors:
        if not t.is_cuda:
            raise RuntimeError(
                f"duet's Triton kernels need CUDA tensors (got one on {t.device}); on a CPU set "
                "TRITON_INTERPRET=1 before duet.kernels.triton_kernels is imported, or use DUET_KERNELS=torch"
            )


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(t: Tensor) -> int:
    if not t.is_cuda:
        return 4
    return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


# ------------------------------------------------------------------------------------- act_quant


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, M, K, G, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                      OUT_KIND: tl.constexpr):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_m * ROWS + tl.arange(0, ROWS)
    cols = g * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < M
    mask = rmask[:, None] & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12)
    s = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    y = tl.math.div_rn(x, s[:, None] + tl.zeros(x.shape, tl.float32))
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    _store(y_ptr + offs, y, mask, OUT_KIND)
    tl.store(s_ptr + rows.to(tl.int64) * G + g, s, mask=rmask)


def act_quant(x: Tensor, block_size: int = 128) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`duet.kernels.reference.act_quant`."""
    _check_device(x)
    if not _is_pow2(block_size):
        raise ValueError(f"act_quant: block_size must be a power of two, got {block_size}")
    K = x.shape[-1]
    G = triton.cdiv(K, block_size)
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(*x.shape[:-1], G, dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:
        return y, s
    y_arg, kind = _out_arg(y)
    rows = 16 if INTERPRET else max(1, 4096 // block_size)
    grid = (triton.cdiv(M, rows), G)
    with _device_guard(x):
        _act_quant_kernel[grid](x2, y_arg, s, M, K, G, BLOCK=block_size, ROWS=rows, OUT_KIND=kind,
                                num_warps=4)
    return y, s


# -------------------------------------------------------------------------------- weight_dequant


@triton.jit
def _weight_dequant_kernel(w_ptr, s_ptr, y_ptr, M, N, SN, BLOCK: tl.constexpr, OUT_KIND: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rows = pm * BLOCK + tl.arange(0, BLOCK)
    cols = pn * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + pm * SN + pn)
    _store(y_ptr + offs, w * s, mask, OUT_KIND)


def weight_dequant(
    w: Tensor, scale_inv: Tensor, block_size: int = 128, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Triton version of :func:`duet.kernels.reference.weight_dequant`."""
    _check_device(w, scale_inv)
    if w.dim() != 2:
        raise ValueError(f"weight_dequant expects a 2-D weight, got shape {tuple(w.shape)}")
    if not _is_pow2(block_size):
        raise ValueError(f"weight_dequant: block_size must be a power of two, got {block_size}")
    M, N = w.shape
    SM, SN = triton.cdiv(M, block_size), triton.cdiv(N, block_size)
    if tuple(scale_inv.shape) != (SM, SN):
        raise ValueError(
            f"weight_dequant: scale_inv shape {tuple(scale_inv.shape)} does not match {(SM, SN)} "
            f"for a [{M}, {N}] weight with block_size={block_size}"
        )
    y = torch.empty(M, N, dtype=dtype, device=w.device)
    if M == 0 or N == 0:
        return y
    y_arg, kind = _out_arg(y)
    with _device_guard(w):
        _weight_dequant_kernel[(SM, SN)](w.contiguous(), scale_inv.float().contiguous(), y_arg, M, N, SN,
                                         BLOCK=block_size, OUT_KIND=kind, num_warps=8)
    return y


# ------------------------------------------------------------------------------------- fp8_gemm


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, KB, M_BUCKET,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, OUT_KIND: tl.constexpr,
                     UPCAST: tl.constexpr):
    """c[M, N] = (a[M, K] * a_s) @ (b[N, K] * b_s).T; BLOCK_K is the 128-wide scale block, so each
    K step multiplies its partial product by one scale per row of a and one per 128 columns of b.
    M_BUCKET (next power of two of M) is only an autotuning key."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row-blocks sweep the columns together so b tiles are reused from L2.
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/columns are clamped (wrapped) for the loads and masked at the store.
    rm = offs_m % M
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * K + offs_k[None, :]
    b_ptrs = b_ptr + rn[None, :].to(tl.int64) * K + offs_k[:, None]
    as_ptrs = as_ptr + rm.to(tl.int64) * KB
    bs_ptrs = bs_ptr + (rn // BLOCK_K) * KB
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
        a_s = tl.load(as_ptrs + kb)
        b_s = tl.load(bs_ptrs + kb)
        part = _dot(a, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, False)
        acc += part * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    _store(c_ptrs, acc, mask, OUT_KIND)


def _gemm_configs(small_m: bool) -> list:
    # (BLOCK_M, BLOCK_N, warps, stages).  All compile for sm_90a without register spills (checked with
    # Triton 3.9's ptxas); 128x256 and 256x128 tiles spill because the per-K-step partial product is a
    # second accumulator, so they are left out.
    if small_m:
        shapes = [(16, 64, 4, 5), (32, 64, 4, 5), (16, 128, 4, 4), (32, 128, 4, 5), (64, 64, 4, 5),
                  (64, 128, 4, 4)]
    else:
        shapes = [(128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4), (128, 64, 4, 4), (64, 256, 8, 3)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, w, s in shapes
    ]


_fp8_gemm_small = triton.autotune(configs=_gemm_configs(True), key=["N", "K", "M_BUCKET"])(
    _fp8_gemm_kernel
) if not INTERPRET else None
_fp8_gemm_large = triton.autotune(configs=_gemm_configs(False), key=["N", "K", "M_BUCKET"])(
    _fp8_gemm_kernel
) if not INTERPRET else None


def fp8_gemm(
    a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Triton version of :func:`duet.kernels.reference.fp8_gemm` (DeepSeek's block-scaled FP8 GEMM)."""
    _check_device(a, a_s, b, b_s)
    block = 128
    N, K = b.shape
    if a.shape[-1] != K:
        raise ValueError(f"fp8_gemm: a has K={a.shape[-1]} but b is {tuple(b.shape)}")
    KB = triton.cdiv(K, block)
    if tuple(b_s.shape) != (triton.cdiv(N, block), KB) or a_s.shape[-1] != KB:
        raise ValueError(f"fp8_gemm: scale shapes a_s {tuple(a_s.shape)}, b_s {tuple(b_s.shape)} do not fit "
                         f"a {tuple(a.shape)}, b {tuple(b.shape)}")
    lead = a.shape[:-1]
    a2 = a.reshape(-1, K).contiguous()
    as2 = a_s.reshape(-1, KB).float().contiguous()
    M = a2.shape[0]
    c = torch.empty(*lead, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    c_arg, kind = _out_arg(c)
    args = (a2, b.contiguous(), c_arg, as2, b_s.float().contiguous(), M, N, K, KB, triton.next_power_of_2(M))
    with _device_guard(a):
        if INTERPRET:
            bm, bn = 16, 32
            grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
            _fp8_gemm_kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block, GROUP_M=4,
                                   EVEN_K=K % block == 0, OUT_KIND=kind, UPCAST=True)
        else:
            kernel = _fp8_gemm_small if M <= 64 else _fp8_gemm_large

            def grid(meta):
                return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

            kernel[grid](*args, BLOCK_K=block, EVEN_K=K % block == 0, OUT_KIND=kind, UPCAST=False)
    return c


# ------------------------------------------------------------------------------------- fused MoE


@triton.jit
def _moe_gemm_kernel(a_ptr, b_ptr, b2_ptr, c_ptr, w_ptr, ids_ptr, blk_expert_ptr,
                     N, K, num_valid, stride_am, stride_be, stride_bn, stride_cm,
                     TOP_K: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     OUT_KIND: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Grouped GEMM over expert-sorted rows.

    Program (pid_m, pid_n) takes the BLOCK_M assignment ids ``ids[pid_m*BLOCK_M:...]`` (all routed to
    expert ``blk_expert[pid_m]``; padding ids are >= num_valid), reads their A rows (row ``id // TOP_K``),
    and writes ``C[id, n-tile] = A_rows @ B[e].T`` -- with ``silu(A @ B.T) * (A @ B2.T)`` when GATED, and
    times the routing weight ``w[id]`` when MUL_WEIGHT.  B is ``[E, N, K]`` with K contiguous.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(blk_expert_ptr + pid_m)
    if e < 0:
        return
    ids = tl.load(ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = ids < num_valid
    a_rows = tl.where(valid, ids // TOP_K, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_off = e.to(tl.int64) * stride_be + rn[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    b_ptrs = b_ptr + b_off
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        b2_ptrs = b2_ptr + b_off
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
        acc = _dot(a, b, acc, UPCAST, IEEE)
        if GATED:
            b2 = tl.load(b2_ptrs, mask=kmask[:, None], other=0.0)
            acc2 = _dot(a, b2, acc2, UPCAST, IEEE)
            b2_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc2
    if MUL_WEIGHT:
        wt = tl.load(w_ptr + ids, mask=valid, other=0.0)
        acc = acc * wt[:, None]
    c_ptrs = c_ptr + ids[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    _store(c_ptrs, acc, valid[:, None] & (offs_n[None, :] < N), OUT_KIND)


def _moe_block_m(n_assign: int, num_experts: int) -> int:
    if INTERPRET:
        return 16
    per_expert = n_assign / max(num_experts, 1)
    if per_expert <= 16:
        return 16
    if per_expert <= 32:
        return 32
    return 64


def _moe_launch(a, b, b2, c, w, sorted_ids, blk_expert, n_assign, top_k, gated, block_m):
    N, K = b.shape[1], b.shape[2]
    c_arg, kind = _out_arg(c)
    if INTERPRET:
        bn, bk, warps, stages = 32, 32, 4, 1
    else:
        bn, bk = (64, 128) if block_m <= 32 else (128, 64)
        warps, stages = 4, (4 if gated else 5)
    grid = (blk_expert.numel(), triton.cdiv(N, bn))
    _moe_gemm_kernel[grid](
        a, b, b2 if b2 is not None else b, c_arg, w if w is not None else c, sorted_ids, blk_expert,
        N, K, n_assign, a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        TOP_K=top_k, GATED=gated, MUL_WEIGHT=w is not None,
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, OUT_KIND=kind,
        UPCAST=INTERPRET, IEEE=a.dtype == torch.float32,
        num_warps=warps, num_stages=stages,
    )


def fused_moe(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, topk_ids: Tensor, topk_weights: Tensor
) -> Tensor:
    """Triton version of :func:`duet.kernels.reference.fused_moe`.

    Launches: the expert sort/pad (a few small torch ops, no host sync), one grouped GEMM for
    gate/up with SiLU*up fused (hidden kept per assignment in x's dtype), one grouped GEMM for down
    with the routing weight applied (fp32, per assignment), and the sum over the top-k slots.
    """
    _check_device(x, w_gate, w_up, w_down, topk_ids, topk_weights)
    T, D = x.shape
    E, I, _ = w_gate.shape
    k = topk_ids.shape[1]
    n = T * k
    if n == 0:
        return torch.zeros_like(x)
    block_m = _moe_block_m(n, E)
    sorted_ids, blk_expert, _ = _ref.moe_align(topk_ids, E, block_m)
    x = x.contiguous()
    w_gate, w_up, w_down = w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()
    h = torch.empty(n, I, dtype=x.dtype, device=x.device)
    y = torch.empty(n, D, dtype=torch.float32, device=x.device)
    w = topk_weights.reshape(-1).float().contiguous()
    with _device_guard(x):
        _moe_launch(x, w_gate, w_up, h, None, sorted_ids, blk_expert, n, k, True, block_m)
        _moe_launch(h, w_down, None, y, w, sorted_ids, blk_expert, n, 1, False, block_m)
    return y.view(T, k, D).sum(dim=1).to(x.dtype)


# ------------------------------------------------------------------------------------ MLA decode


@triton.jit
def _mla_decode_kernel(qn_ptr, qp_ptr, kv_ptr, kp_ptr, len_ptr, o_ptr, lse_ptr,
                       qk_scale, S, H, R, P, chunk, num_splits,
                       stride_kvb, stride_kvt, stride_kpb, stride_kpt,
                       BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_P: tl.constexpr, DIRECT: tl.constexpr, OUT_KIND: tl.constexpr,
                       UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """One (head block, KV split, batch row): flash-decoding partial over cache positions
    ``[split*chunk, min((split+1)*chunk, length))``.  Query rows are the flattened (s, h) pairs; row
    ``s*H+h`` may see positions ``<= length - S + s``.  Scores are in log2 units (qk_scale includes
    log2(e)).  DIRECT (one split): write the normalised output.  Otherwise write the unnormalised-then-
    normalised partial output and its log2-sum-exp for the combine kernel."""
    pid_h = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    SH = S * H
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < SH
    length = tl.load(len_ptr + b)
    q_pos = length - S + rows // H
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    r_mask = offs_r < R
    p_mask = offs_p < P
    q_off = (b * SH + rows).to(tl.int64)
    qn = tl.load(qn_ptr + q_off[:, None] * R + offs_r[None, :], mask=row_mask[:, None] & r_mask[None, :],
                 other=0.0)
    qp = tl.load(qp_ptr + q_off[:, None] * P + offs_p[None, :], mask=row_mask[:, None] & p_mask[None, :],
                 other=0.0)

    start = split * chunk
    end = tl.minimum(start + chunk, length)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_R), tl.float32)
    kv_base = kv_ptr + b.to(tl.int64) * stride_kvb
    kp_base = kp_ptr + b.to(tl.int64) * stride_kpb
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < end
        kv = tl.load(kv_base + offs_t[:, None].to(tl.int64) * stride_kvt + offs_r[None, :],
                     mask=t_mask[:, None] & r_mask[None, :], other=0.0)
        kp = tl.load(kp_base + offs_t[:, None].to(tl.int64) * stride_kpt + offs_p[None, :],
                     mask=t_mask[:, None] & p_mask[None, :], other=0.0)
        s = _dot(qn, tl.trans(kv), tl.zeros((BLOCK_H, BLOCK_T), tl.float32), UPCAST, IEEE)
        s = _dot(qp, tl.trans(kp), s, UPCAST, IEEE)
        s = s * qk_scale
        allowed = (offs_t[None, :] <= q_pos[:, None]) & t_mask[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if UPCAST:
            acc = _dot(p, kv, acc * alpha[:, None], UPCAST, IEEE)
        else:
            acc = _dot(p.to(kv.dtype), kv, acc * alpha[:, None], UPCAST, IEEE)
        m_i = m_new
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if DIRECT:
        _store(o_ptr + q_off[:, None] * R + offs_r[None, :], out, row_mask[:, None] & r_mask[None, :],
               OUT_KIND)
    else:
        part = (q_off * num_splits + split)
        tl.store(o_ptr + part[:, None] * R + offs_r[None, :], out, mask=row_mask[:, None] & r_mask[None, :])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + part, lse, mask=row_mask)


@triton.jit
def _mla_combine_kernel(o_part_ptr, lse_ptr, out_ptr, R, num_splits,
                        BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, OUT_KIND: tl.constexpr):
    """Merge the per-split partials of one query row (softmax-weighted by each split's sum-exp)."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_r = tl.arange(0, BLOCK_R)
    s_mask = offs_s < num_splits
    r_mask = offs_r < R
    lse = tl.load(lse_ptr + row * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    w = w / tl.maximum(tl.sum(w, axis=0), 1e-30)
    o = tl.load(o_part_ptr + (row * num_splits + offs_s[:, None]) * R + offs_r[None, :],
                mask=s_mask[:, None] & r_mask[None, :], other=0.0)
    out = tl.sum(o * w[:, None], axis=0)
    _store(out_ptr + row * R + offs_r, out, r_mask, OUT_KIND)


def _mla_configs() -> list:
    # (BLOCK_H, BLOCK_T, warps, stages).  The first three compile for sm_90a without spills; the BLOCK_H=64
    # ones (wgmma, a quarter of the L2 re-reads of BLOCK_H=16 at H=128) spill a little; autotuning decides.
    shapes = [(16, 32, 4, 2), (32, 32, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2), (64, 16, 8, 2)]
    return [
        triton.Config({"BLOCK_H": bh, "BLOCK_T": bt}, num_warps=w, num_stages=s) for bh, bt, w, s in shapes
    ]


_mla_decode_tuned = triton.autotune(configs=_mla_configs(), key=["S", "H", "R", "P", "num_splits"])(
    _mla_decode_kernel
) if not INTERPRET else None

_LOG2E = 1.4426950408889634


def mla_decode(
    q_latent: Tensor, q_pe: Tensor, kv_latent: Tensor, k_pe: Tensor, lengths: Tensor, softmax_scale: float,
    *, num_splits: int | None = None, block_h: int | None = None, block_t: int | None = None,
) -> Tensor:
    """Triton version of :func:`duet.kernels.reference.mla_decode` (split-KV flash-decoding).

    The KV range ``[0, kv_latent.shape[1])`` is cut into ``num_splits`` equal chunks (chosen from the
    batch size and the SM count when not given; no host sync on ``lengths``), each chunk's partial
    softmax is computed per (head block, split, row) and a second kernel merges them; with one split
    the output is written directly.  For the best split balance pass the caches sliced to the longest
    row (a view).  ``block_h``/``block_t`` override the tile sizes (tests).
    """
    _check_device(q_latent, q_pe, kv_latent, k_pe, lengths)
    B, S, H, R = q_latent.shape
    P = q_pe.shape[-1]
    T = kv_latent.shape[1]
    out = torch.empty_like(q_latent)
    if B == 0 or S == 0 or H == 0:
        return out
    qn = q_latent.contiguous()
    qp = q_pe.contiguous()
    kv = kv_latent if kv_latent.stride(-1) == 1 else kv_latent.contiguous()
    kp = k_pe if k_pe.stride(-1) == 1 else k_pe.contiguous()
    lens = lengths.to(device=q_latent.device, dtype=torch.int32).contiguous()
    ieee = q_latent.dtype == torch.float32
    BLOCK_R = triton.next_power_of_2(R)
    BLOCK_P = triton.next_power_of_2(P)
    rows = S * H
    tile_t = block_t or (16 if INTERPRET else 64)
    if num_splits is None:
        programs = B * triton.cdiv(rows, 32)
        sms = _num_sms(q_latent)
        num_splits = 1 if programs >= sms else triton.cdiv(2 * sms, programs)
        num_splits = max(1, min(num_splits, triton.cdiv(T, 256)))
    chunk = triton.cdiv(triton.cdiv(max(T, 1), num_splits), tile_t) * tile_t
    num_splits = max(1, triton.cdiv(T, chunk))
    direct = num_splits == 1
    out_arg, kind = _out_arg(out)
    if direct:
        o_buf, lse = out_arg, out_arg  # lse unused
    else:
        o_buf = torch.empty(B, rows, num_splits, R, dtype=torch.float32, device=q_latent.device)
        lse = torch.empty(B, rows, num_splits, dtype=torch.float32, device=q_latent.device)
    args = (qn, qp, kv, kp, lens, o_buf, lse, softmax_scale * _LOG2E, S, H, R, P, chunk, num_splits,
            kv.stride(0), kv.stride(1), kp.stride(0), kp.stride(1))
    consts = dict(BLOCK_R=BLOCK_R, BLOCK_P=BLOCK_P, DIRECT=direct, OUT_KIND=kind if direct else _NATIVE,
                  UPCAST=INTERPRET, IEEE=ieee)
    with _device_guard(q_latent):
        if INTERPRET or block_h is not None or block_t is not None:
            bh = block_h or 16
            _mla_decode_kernel[(triton.cdiv(rows, bh), num_splits, B)](
                *args, BLOCK_H=bh, BLOCK_T=tile_t, **consts, num_warps=4)
        else:
            def grid(meta):
                return (triton.cdiv(rows, meta["BLOCK_H"]), num_splits, B)

            _mla_decode_tuned[grid](*args, **consts)
        if not direct:
            _mla_combine_kernel[(B * rows,)](o_buf, lse, out_arg, R, num_splits,
                                             BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_R=BLOCK_R,
                                             OUT_KIND=kind, num_warps=4)
    return out
