"""duet.kernels: the torch references against naive math, the Triton kernels against the references
(on the CPU through Triton's interpreter), and the DUET_KERNELS dispatch.

How TRITON_INTERPRET is handled: Triton picks "interpret" vs "compile for a GPU" when ``@triton.jit``
decorates a function -- for Triton's own ``tl.max``/``tl.sum``... when ``triton`` is first imported, for
duet's kernels when ``duet.kernels.triton_kernels`` is imported.  So the variable has to be set before
the process's first ``import triton``.  The module-scoped ``tk`` fixture:

* if Triton is not imported yet (the normal case: importing torch or duet.kernels does not import it)
  or was imported in interpreter mode, sets ``TRITON_INTERPRET=1`` and imports (or reloads)
  ``duet.kernels.triton_kernels`` in-process, asserting ``tk.INTERPRET``;
* if something earlier in the session imported Triton in compiled mode, the in-process route is
  impossible, so the fixture skips and ``test_triton_kernels_in_fresh_process`` reruns every
  Triton test of this file in a fresh ``pytest`` process with ``TRITON_INTERPRET=1`` (that test skips
  itself whenever the in-process route works).

Either way the Triton kernels are checked regardless of test order.  The environment is restored after
the module; Triton stays imported in interpreter mode for the rest of the session, which is harmless
on the CPU-only suite.  Without Triton installed, the Triton tests skip and the reference/dispatch
tests still run.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import duet.kernels as K
from duet.kernels import reference as ref

FP8 = torch.float8_e4m3fn
MOD = "duet.kernels.triton_kernels"


def _in_process_interpreter_ok() -> bool:
    """True unless Triton was already imported in compiled (non-interpreter) mode in this process."""
    if "triton" not in sys.modules:
        return True
    import triton.language as tl

    return type(tl.max).__name__ == "InterpretedFunction"


@pytest.fixture(scope="module")
def tk():
    if importlib.util.find_spec("triton") is None:  # not importorskip: that would import it too early
        pytest.skip("triton is not installed")
    if not _in_process_interpreter_ok():
        pytest.skip("Triton was imported in compiled mode earlier in this session; "
                    "test_triton_kernels_in_fresh_process runs these tests instead")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    before = sys.modules.get(MOD)
    if before is None:
        mod = importlib.import_module(MOD)
    elif not before.INTERPRET:
        mod = importlib.reload(before)
    else:
        mod = before
    assert mod.INTERPRET, "Triton kernels were not built in interpreter mode"
    try:
        yield mod
    finally:
        mp.undo()
        if before is None:
            sys.modules.pop(MOD, None)
            if hasattr(K, "triton_kernels"):
                delattr(K, "triton_kernels")


def test_triton_kernels_in_fresh_process():
    """Fallback for sessions where Triton was imported in compiled mode before this file ran."""
    if _in_process_interpreter_ok():
        pytest.skip("the Triton tests run in-process (see the tk fixture)")
    env = {k: v for k, v in os.environ.items() if k != "DUET_KERNELS"}
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "triton and not fresh"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(dtype)


def rand_fp8(*shape, seed=0, scale=40.0):
    return randn(*shape, seed=seed, scale=scale).clamp(-448, 448).to(FP8)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


# ============================================================================== references vs math


@pytest.mark.parametrize("shape", [(4, 128), (3, 300), (2, 3, 200), (1, 1)])
def test_act_quant_reference(shape):
    x = randn(*shape, seed=1, scale=5.0)
    if shape[-1] >= 256:
        x[..., 128:256] = 0.0  # an all-zero group
    y, s = ref.act_quant(x)
    K_ = shape[-1]
    G = math.ceil(K_ / 128)
    assert y.dtype == FP8 and y.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], G)
    for g in range(G):
        xg = x[..., g * 128 : (g + 1) * 128]
        yg = y[..., g * 128 : (g + 1) * 128].float()
        amax = xg.abs().amax(-1)
        torch.testing.assert_close(s[..., g], amax.clamp_min(1e-12) / 448, rtol=0, atol=0)
        nz = amax > 0
        # The group maximum maps to exactly +-448, everything else within e4m3's rounding error.
        assert torch.all(yg.abs().amax(-1)[nz] == 448)
        assert torch.all(yg[~nz] == 0)
        err = (yg * s[..., g, None] - xg).abs()
        bound = torch.maximum(xg.abs() / 16, s[..., g, None] * 2.0**-10) * 1.0001
        assert torch.all(err <= bound)


def test_weight_dequant_reference():
    M, N, b = 200, 300, 128
    w = rand_fp8(M, N, seed=2)
    si = torch.rand(2, 3, generator=gen(3)) + 0.5
    out = ref.weight_dequant(w, si, b, torch.float32)
    expect = torch.empty(M, N)
    for i in range(2):
        for j in range(3):
            blk = (slice(i * b, (i + 1) * b), slice(j * b, (j + 1) * b))
            expect[blk] = w[blk].float() * si[i, j]
    assert torch.equal(out, expect)
    assert ref.weight_dequant(w, si, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="scale_inv shape"):
        ref.weight_dequant(w, si[:1])


def _gemm_naive(a, a_s, b, b_s):
    """Sum over 128-wide K blocks of (a_blk @ b_blk.T) * a_scale * b_scale, in float64."""
    a2 = a.reshape(-1, a.shape[-1]).double()
    as2 = a_s.reshape(-1, a_s.shape[-1]).double()
    N, K_ = b.shape
    out = torch.zeros(a2.shape[0], N, dtype=torch.float64)
    bsc = b_s.double().repeat_interleave(128, 0)[:N]
    for kb in range(math.ceil(K_ / 128)):
        ks = slice(kb * 128, (kb + 1) * 128)
        out += (a2[:, ks] @ b[:, ks].double().T) * as2[:, kb, None] * bsc[None, :, kb]
    return out.reshape(*a.shape[:-1], N)


def test_fp8_gemm_reference():
    a, a_s = ref.act_quant(randn(2, 3, 300, seed=4))
    b = rand_fp8(150, 300, seed=5)
    b_s = torch.rand(2, 3, generator=gen(6)) + 0.1
    out = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    assert out.shape == (2, 3, 150)
    expect = _gemm_naive(a, a_s, b, b_s)
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-4 * expect.abs().max().item())
    assert ref.fp8_gemm(a, a_s, b, b_s).dtype == torch.bfloat16


def moe_inputs(T, D, I, E, k, seed=0, used=None, dtype=torch.float32):
    x = randn(T, D, seed=seed, dtype=dtype)
    wg = randn(E, I, D, seed=seed + 1, scale=D**-0.5, dtype=dtype)
    wu = randn(E, I, D, seed=seed + 2, scale=D**-0.5, dtype=dtype)
    wd = randn(E, D, I, seed=seed + 3, scale=I**-0.5, dtype=dtype)
    used = E if used is None else used  # experts >= used receive no tokens
    g = gen(seed + 4)
    ids = torch.stack([torch.randperm(used, generator=g)[:k] for _ in range(T)]).to(torch.int64)
    tw = torch.rand(T, k, generator=g)
    return x, wg, wu, wd, ids, tw


def _moe_dense_naive(x, wg, wu, wd, ids, tw):
    x, wg, wu, wd, tw = (t.double() for t in (x, wg, wu, wd, tw))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = F.silu(wg[e] @ x[t]) * (wu[e] @ x[t])
            out[t] += tw[t, j] * (wd[e] @ h)
    return out


@pytest.mark.parametrize("T,E,k,used", [(1, 4, 1, 4), (3, 8, 2, 8), (7, 8, 2, 5), (20, 4, 3, 4)])
def test_fused_moe_reference(T, E, k, used):
    """T * k <= E runs each (token, expert) pair on its own (decoding), more tokens are grouped by expert."""
    args = moe_inputs(T, 48, 40, E, k, seed=T, used=used)
    out = ref.fused_moe(*args)
    torch.testing.assert_close(out.double(), _moe_dense_naive(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,E,k,used", [(1, 4, 1, 4), (3, 8, 2, 8), (20, 4, 3, 4)])
def test_fused_moe_dense_equals_sparse(T, E, k, used):
    """The static paths for torch.compile (the chosen experts gathered for T*k <= E, all experts beyond)
    equal the grouped one within fp32 noise, and the dispatcher takes them only when asked (or compiling)."""
    args = moe_inputs(T, 48, 40, E, k, seed=T + 1, used=used)
    sparse = ref.fused_moe(*args)
    torch.testing.assert_close(ref.fused_moe(*args, dense=True), sparse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.fused_moe(*args, dense=True), sparse, rtol=1e-5, atol=1e-5)
    assert torch.equal(K.fused_moe(*args), sparse)


@pytest.mark.parametrize("S,lengths", [(1, [9, 1, 5]), (3, [9, 3, 6]), (1, [4, 4, 4])])
def test_mla_decode_reference_untrimmed(S, lengths):
    """trim=False (no host sync) attends over every position with the mask: same result, NaN padding
    past the lengths (here also past the longest row) never read."""
    args = mla_inputs(3, S, 2, 8, 4, 12, lengths, seed=S)
    out = ref.mla_decode(*args, softmax_scale=0.3, trim=False)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _mla_naive(*args, 0.3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.mla_decode(*args, 0.3, trim=False), ref.mla_decode(*args, softmax_scale=0.3))


def test_moe_align():
    ids = torch.tensor([[0, 3], [3, 1], [3, 0], [1, 3]])
    sorted_ids, blk, counts = ref.moe_align(ids, num_experts=5, block_m=2)
    n = ids.numel()
    assert counts.tolist() == [2, 2, 0, 4, 0]
    real = sorted_ids[sorted_ids < n]
    assert sorted(real.tolist()) == list(range(n))  # every assignment exactly once
    flat = ids.reshape(-1)
    active = blk[blk >= 0]
    assert active.tolist() == [0, 1, 3, 3]  # experts 2 and 4 get no block
    for i, e in enumerate(blk.tolist()):
        chunk = sorted_ids[i * 2 : (i + 1) * 2]
        chunk = chunk[chunk < n]
        if e < 0:
            assert chunk.numel() == 0
        else:
            assert torch.all(flat[chunk.long()] == e)


def mla_inputs(B, S, H, R, P, T, lengths, seed=0, dtype=torch.float32, nan_pad=True):
    q = randn(B, S, H, R, seed=seed, dtype=dtype)
    qp = randn(B, S, H, P, seed=seed + 1, dtype=dtype)
    kv = randn(B, T, R, seed=seed + 2, dtype=dtype)
    kp = randn(B, T, P, seed=seed + 3, dtype=dtype)
    lens = torch.tensor(lengths)
    if nan_pad:  # padding must never reach the result
        for b, n in enumerate(lengths):
            kv[b, n:] = float("nan")
            kp[b, n:] = float("nan")
    return q, qp, kv, kp, lens


def _mla_naive(q, qp, kv, kp, lens, scale):
    B, S, H, R = q.shape
    out = torch.zeros(B, S, H, R, dtype=torch.float64)
    for b in range(B):
        for s in range(S):
            p = int(lens[b]) - S + s
            kvb, kpb = kv[b, : p + 1].double(), kp[b, : p + 1].double()
            for h in range(H):
                sc = (kvb @ q[b, s, h].double() + kpb @ qp[b, s, h].double()) * scale
                out[b, s, h] = torch.softmax(sc, 0) @ kvb
    return out


@pytest.mark.parametrize("S,lengths", [(1, [9, 1, 5]), (3, [9, 3, 6])])
def test_mla_decode_reference(S, lengths):
    args = mla_inputs(3, S, 2, 8, 4, 9, lengths, seed=S)
    out = ref.mla_decode(*args, softmax_scale=0.3)
    assert out.shape == (3, S, 2, 8) and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _mla_naive(*args, 0.3), rtol=1e-5, atol=1e-5)


# ================================================================ Triton (interpreter) vs reference


def test_triton_interpreter_mode(tk):
    assert tk.INTERPRET


@pytest.mark.parametrize("shape,block", [((1, 128), 128), ((5, 300), 128), ((2, 3, 200), 128), ((3, 96), 64),
                                         ((1, 1), 128), ((17, 130), 128)])
def test_act_quant_triton(tk, shape, block):
    x = randn(*shape, seed=7, scale=3.0)
    if shape[-1] > block:
        x[..., :block] = 0.0  # an all-zero group
    x.view(-1)[-1] = 1e-30  # far below e4m3's subnormals relative to its group
    y, s = tk.act_quant(x, block)
    yr, sr = ref.act_quant(x, block)
    assert y.dtype == FP8 and y.shape == x.shape and s.shape == sr.shape
    assert torch.equal(s, sr)
    assert torch.equal(bits(y), bits(yr))


def test_act_quant_triton_fp8_rounding_exhaustive(tk):
    """Every finite e4m3 value, every midpoint between neighbours (round-half-even ties), values just
    either side of them, and random values go through the kernel's fp8 encoder with scale exactly 1
    (each row's first element is 448), bit-for-bit against torch's own cast."""
    vals = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    vals = vals[torch.isfinite(vals)].unique()  # sorted, -448..448
    mids = (vals[1:] + vals[:-1]) / 2
    near = [mids * (1 + 1e-6), mids * (1 - 1e-6), mids.nextafter(mids + 1), mids.nextafter(mids - 1)]
    eps = torch.cat(near)
    rnd = randn(2000, seed=8) * torch.logspace(-12, 8.8, 2000, base=2.0)
    pool = torch.cat([vals, mids, eps, rnd, torch.tensor([0.0, -0.0, 2.0**-10, -(2.0**-10), 2.0**-6])])
    pool = pool.clamp(-448, 448)
    rows = math.ceil(pool.numel() / 127)
    body = torch.zeros(rows * 127)
    body[: pool.numel()] = pool
    x = torch.cat([torch.full((rows, 1), 448.0), body.view(rows, 127)], dim=1)
    y, s = tk.act_quant(x)
    assert torch.all(s == 1.0)
    assert torch.equal(bits(y), bits(x.to(FP8)))


@pytest.mark.parametrize("M,N,block", [(200, 300, 128), (128, 128, 128), (1, 5, 128), (70, 33, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_dequant_triton(tk, M, N, block, dtype):
    w = rand_fp8(M, N, seed=M + N)
    si = torch.rand(math.ceil(M / block), math.ceil(N / block), generator=gen(9)) * 1e-2 + 1e-3
    out = tk.weight_dequant(w, si, block, dtype)
    assert out.dtype == dtype and out.shape == (M, N)
    assert torch.equal(out, ref.weight_dequant(w, si, block, dtype))


@pytest.mark.parametrize("a_shape,N", [((1, 128), 64), ((5, 300), 150), ((2, 3, 256), 130), ((17, 40), 7)])
def test_fp8_gemm_triton(tk, a_shape, N):
    a, a_s = ref.act_quant(randn(*a_shape, seed=10, scale=2.0))
    Kd = a_shape[-1]
    b = rand_fp8(N, Kd, seed=11)
    b_s = torch.rand(math.ceil(N / 128), math.ceil(Kd / 128), generator=gen(12)) * 1e-2 + 1e-3
    out = tk.fp8_gemm(a, a_s, b, b_s, torch.float32)
    expect = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    assert out.shape == (*a_shape[:-1], N)
    scale = expect.abs().max().item()
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6 * scale)
    out16 = tk.fp8_gemm(a, a_s, b, b_s)  # bf16 output, rounded in-kernel
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), expect, rtol=8e-3, atol=1e-5 * scale)


@pytest.mark.parametrize("T,E,k,used", [(1, 4, 1, 4), (1, 8, 6, 8), (7, 8, 2, 5), (40, 4, 3, 4)])
def test_fused_moe_triton(tk, T, E, k, used):
    """(1, ...): a single token; (7, 8, 2, 5): experts 5..7 get no tokens; (40, 4, 3): 30 tokens per
    expert, several 16-row blocks per expert; D=48, I=40 are not multiples of the tiles."""
    args = moe_inputs(T, 48, 40, E, k, seed=T + E, used=used)
    out = tk.fused_moe(*args)
    torch.testing.assert_close(out, ref.fused_moe(*args), rtol=1e-5, atol=1e-5)


def test_fused_moe_triton_bf16(tk):
    args = moe_inputs(9, 64, 32, 6, 2, seed=3, used=4, dtype=torch.bfloat16)
    out = tk.fused_moe(*args)
    expect = ref.fused_moe(*args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expect.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "S,H,R,lengths,splits",
    [
        (1, 4, 32, [70, 1, 33], 1),  # direct path (one split), a row with a single cached token
        (1, 4, 32, [70, 1, 33], 3),  # split-KV + combine; row 1's later splits are empty
        (3, 3, 40, [70, 3, 17], None),  # speculative verify (S=3), H=3 and R=40 not powers of two
        (2, 16, 32, [5], 4),  # one row, more splits than blocks of valid cache
    ],
)
def test_mla_decode_triton(tk, S, H, R, lengths, splits):
    args = mla_inputs(len(lengths), S, H, R, 16, 70, lengths, seed=S * 10 + H)
    out = tk.mla_decode(*args, softmax_scale=0.12, num_splits=splits)
    expect = ref.mla_decode(*args, softmax_scale=0.12)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_mla_decode_triton_bf16_strided_cache(tk):
    """bf16 queries and cache, the cache being views into a wider [B, T, R + P] buffer."""
    B, S, H, R, P, T = 2, 1, 8, 32, 16, 50
    q, qp, kv, kp, lens = mla_inputs(B, S, H, R, P, T, [50, 23], seed=5, dtype=torch.bfloat16)
    buf = torch.cat([kv, kp], dim=-1)
    kv_v, kp_v = buf[..., :R], buf[..., R:]
    out = tk.mla_decode(q, qp, kv_v, kp_v, lens, 0.2, num_splits=2)
    expect = ref.mla_decode(q, qp, kv, kp, lens, 0.2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expect.float(), rtol=1e-2, atol=1e-2)


# ======================================================================================= dispatch


def test_dispatch_torch_and_auto_on_cpu(monkeypatch):
    x = torch.zeros(2, 128)
    monkeypatch.setenv(K.ENV_VAR, "torch")
    assert K.backend_for(x) == "torch"
    monkeypatch.setenv(K.ENV_VAR, "auto")
    assert K.backend_for(x) == "torch"
    monkeypatch.delenv(K.ENV_VAR)
    assert K.requested_backend() == "auto" and K.backend_for(x) == "torch"
    assert "DUET_KERNELS" in K.describe()
    y, s = K.act_quant(x)
    assert torch.equal(bits(y), bits(ref.act_quant(x)[0]))


def test_dispatch_invalid_value(monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="DUET_KERNELS"):
        K.backend_for(torch.zeros(1))
    with pytest.raises(ValueError, match="DUET_KERNELS"):
        K.weight_dequant(rand_fp8(4, 4), torch.ones(1, 1))


def test_dispatch_fp8_kernels_need_sm89(monkeypatch):
    """On a CUDA device without FP8 (e.g. an A100), auto keeps the FP8 kernels on torch, forced fails."""

    class FakeCudaTensor:
        is_cuda = True
        device = torch.device("cuda", 0)

    monkeypatch.setattr(K, "_triton_import_error", lambda: None)
    monkeypatch.setattr(K, "_fp8_capable", lambda tensor: False)
    t = FakeCudaTensor()
    monkeypatch.setenv(K.ENV_VAR, "auto")
    assert K.backend_for(t, "fused_moe") == "triton" and K.backend_for(t) == "triton"
    assert all(K.backend_for(t, name) == "torch" for name in K.FP8_KERNELS)
    monkeypatch.setenv(K.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="FP8"):
        K.backend_for(t, "fp8_gemm")


def test_dispatch_forced_triton(tk, monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "triton")
    x = randn(3, 200, seed=13)
    assert K.backend_for(x) == "triton"
    y, s = K.act_quant(x)
    assert torch.equal(bits(y), bits(tk.act_quant(x)[0]))
    args = moe_inputs(3, 32, 16, 4, 2, seed=14)
    torch.testing.assert_close(K.fused_moe(*args), ref.fused_moe(*args), rtol=1e-5, atol=1e-5)
    # Triton kernels have no backward: under autograd (training) the reference runs and gradients flow
    x, *rest = args
    x = x.clone().requires_grad_()
    out = K.fused_moe(x, *rest)
    assert out.grad_fn is not None
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Forcing Triton on a CPU tensor without the interpreter is an error, not a silent fallback.
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        K.backend_for(x)


def test_import_is_lazy():
    """In a fresh interpreter: importing duet.kernels (and using it on CPU) does not import Triton."""
    code = textwrap.dedent(
        """
        import os, sys, torch
        import duet.kernels as K
        assert "triton" not in sys.modules, "importing duet.kernels imported triton"
        K.weight_dequant(torch.zeros(4, 4).to(torch.float8_e4m3fn), torch.ones(1, 1))
        K.act_quant(torch.ones(2, 8))
        assert "triton" not in sys.modules, "a CPU call under DUET_KERNELS=auto imported triton"
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DUET_KERNELS", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# ==================================================================================== benchmark


BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "kernels.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_benchmark_without_cuda_exits_with_one_line():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, BENCH], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "needs CUDA" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_benchmark_smoke_on_cpu():
    """The whole benchmark script on tiny shapes through the interpreter, its correctness checks included."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DUET_KERNELS")}
    proc = subprocess.run([sys.executable, BENCH, "--smoke"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kernel in ("act_quant", "weight_dequant", "fp8_gemm", "fused_moe", "mla_decode"):
        assert kernel in proc.stdout
    assert "FAIL" not in proc.stdout and proc.stdout.count("ok (") == 8, proc.stdout
    assert "Edge-case correctness (compiled kernels vs reference): 17/17 ok" in proc.stdout, proc.stdout
