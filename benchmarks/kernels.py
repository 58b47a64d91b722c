"""Time duet's Triton kernels against their torch baselines on a CUDA GPU.

    python benchmarks/kernels.py            # everything, < 5 minutes on an H200
    python benchmarks/kernels.py --only moe,mla

For every kernel: the median time of the Triton kernel and of its baseline (the torch reference, or for
fp8_gemm the bf16 cuBLAS matmul), achieved TFLOP/s or GB/s beside the device's peak, the speedup, and a
correctness check of the Triton output against the reference on the same inputs.  The issue's targets
on an H200 are checked at the end:

* fused MoE >= 3x the per-expert torch loop at 64 tokens, 64 experts, top-6 (D=7168, I=2048, bf16);
* MLA decode >= 50% of HBM bandwidth at batch 64, 4K context (H=128, R=512, P=64, bf16 cache);
* fp8_gemm >= 1.5x the bf16 matmul's TFLOP/s at M=4096, N=K=7168.

Without CUDA it exits at once with a one-line message (status 1).  Timing uses Triton's ``do_bench``
(L2 flushed between repetitions, median of the repetitions); the first call of an autotuned kernel
(fp8_gemm, MLA decode) tunes it outside the timed region.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# Dense (non-sparse) peaks: (bf16 TFLOP/s, fp8 TFLOP/s, HBM TB/s), matched on the device name.
PEAKS: list[tuple[str, tuple[float, float | None, float]]] = [
    ("H200", (989.0, 1979.0, 4.8)),
    ("H100 PCIe", (756.0, 1513.0, 2.0)),
    ("H100 NVL", (835.0, 1671.0, 3.9)),
    ("H100", (989.0, 1979.0, 3.35)),
    ("H800", (989.0, 1979.0, 3.35)),
    ("H20", (148.0, 296.0, 4.0)),
    ("GH200", (989.0, 1979.0, 4.0)),
    ("B200", (2250.0, 4500.0, 8.0)),
    ("L40S", (362.0, 733.0, 0.864)),
    ("A100", (312.0, None, 2.0)),
    ("RTX 4090", (165.0, 330.0, 1.0)),
]

MOE_SHAPE = dict(T=64, E=64, k=6, D=7168, I=2048)
MLA_SHAPE = dict(B=64, S=1, T=4096, H=128, R=512, P=64)
GEMM_SHAPE = dict(M=4096, N=7168, K=7168, M_small=64)
QUANT_SHAPE = dict(M=4096, K=7168, N=7168)
DEV = "cuda"

# --smoke: tiny shapes on the CPU through Triton's interpreter, to check this script itself (not speed).
SMOKE_SHAPES = dict(
    MOE_SHAPE=dict(T=5, E=4, k=2, D=64, I=32),
    MLA_SHAPE=dict(B=3, S=1, T=40, H=4, R=32, P=16),
    GEMM_SHAPE=dict(M=20, N=256, K=256, M_small=3),
    QUANT_SHAPE=dict(M=8, K=256, N=256),
)


@dataclass
class Row:
    kernel: str
    shape: str
    impl: str
    ms: float
    metric: str = ""  # "TFLOP/s" or "GB/s"
    value: float = float("nan")
    peak: float | None = None
    speedup: str = ""
    check: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    targets: list[tuple[str, bool | None, str]] = field(default_factory=list)
    edge: list[tuple[str, float, float]] = field(default_factory=list)  # (case, error, tolerance)


def peaks_for(name: str, args) -> tuple[float | None, float | None, float | None]:
    bf16 = fp8 = hbm = None
    for key, (b, f, h) in PEAKS:
        if key.lower() in name.lower():
            bf16, fp8, hbm = b, f, h
            break
    bf16 = args.peak_bf16 or bf16
    fp8 = args.peak_fp8 or fp8
    hbm = args.peak_hbm or hbm
    return bf16, fp8, hbm


def bench(fn, rep_ms: int) -> float:
    """Median milliseconds per call."""
    if DEV != "cuda":  # --smoke: one timed call is enough to exercise the script
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1000
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def check(err: float, tol: float) -> str:
    return f"{'ok' if err <= tol else 'FAIL'} ({err:.1e})"


# ------------------------------------------------------------------------------------------ cases


def case_fp8(report: Report, peaks, rep: int) -> None:
    from duet.kernels import reference as ref
    from duet.kernels import triton_kernels as tk

    # act_quant: bf16 activations -> fp8 + scales.
    M, K, N = QUANT_SHAPE["M"], QUANT_SHAPE["K"], QUANT_SHAPE["N"]
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    y, s = tk.act_quant(x)
    yr, sr = ref.act_quant(x)
    mism = float((y.view(torch.uint8) != yr.view(torch.uint8)).float().mean())
    s_err = rel_err(s, sr)
    chk = f"{'ok' if mism <= 1e-4 and s_err <= 1e-6 else 'FAIL'} ({mism:.1e} bytes differ)"
    nbytes = M * K * (2 + 1) + M * math.ceil(K / 128) * 4
    for impl, fn in (("triton", lambda: tk.act_quant(x)), ("torch", lambda: ref.act_quant(x))):
        ms = bench(fn, rep)
        report.rows.append(Row("act_quant", f"{M}x{K} bf16", impl, ms, "GB/s", nbytes / ms / 1e6, peaks[2],
                               check=chk if impl == "triton" else ""))
    _speedup(report, 2)

    # weight_dequant: fp8 [N, K] + 128x128 scales -> bf16.
    w = (torch.randn(N, K, device=DEV) * 30).clamp(-448, 448).to(torch.float8_e4m3fn)
    ws = torch.rand(N // 128, K // 128, device=DEV) * 1e-2
    out = tk.weight_dequant(w, ws, dtype=torch.bfloat16)
    err = float((out.float() != ref.weight_dequant(w, ws, dtype=torch.bfloat16).float()).float().mean())
    nbytes = N * K * (1 + 2)
    for impl, fn in (
        ("triton", lambda: tk.weight_dequant(w, ws, dtype=torch.bfloat16)),
        ("torch", lambda: ref.weight_dequant(w, ws, dtype=torch.bfloat16)),
    ):
        ms = bench(fn, rep)
        report.rows.append(Row("weight_dequant", f"{N}x{K} fp8->bf16", impl, ms, "GB/s", nbytes / ms / 1e6,
                               peaks[2], check=check(err, 0.0) if impl == "triton" else ""))
    _speedup(report, 2)

    # fp8_gemm: the target shape, plus a decode-sized M for information.
    _gemm_case(report, peaks, rep, GEMM_SHAPE["M"], target=True)
    _gemm_case(report, peaks, rep, GEMM_SHAPE["M_small"], target=False)


def _gemm_case(report: Report, peaks, rep: int, M: int, target: bool) -> None:
    from duet.kernels import reference as ref
    from duet.kernels import triton_kernels as tk

    N, K = GEMM_SHAPE["N"], GEMM_SHAPE["K"]
    a16 = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    b16 = torch.randn(N, K, device=DEV, dtype=torch.bfloat16) / math.sqrt(K)
    a, a_s = ref.act_quant(a16)
    bq = b16.float().view(N // 128, 128, K // 128, 128)
    b_s = bq.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
    b = (bq / b_s[:, None, :, None]).clamp(-448, 448).view(N, K).to(torch.float8_e4m3fn)
    flops = 2 * M * N * K
    c = tk.fp8_gemm(a, a_s, b, b_s)  # autotunes here, outside the timing
    err = rel_err(c, ref.fp8_gemm(a, a_s, b, b_s, torch.float32))
    shape = f"M={M} N={N} K={K}"
    ms_fp8 = bench(lambda: tk.fp8_gemm(a, a_s, b, b_s), rep)
    ms_bf16 = bench(lambda: torch.matmul(a16, b16.T), rep)
    tf_fp8, tf_bf16 = flops / ms_fp8 / 1e9, flops / ms_bf16 / 1e9
    report.rows.append(Row("fp8_gemm", shape, "triton fp8", ms_fp8, "TFLOP/s", tf_fp8, peaks[1],
                           speedup=f"{tf_fp8 / tf_bf16:.2f}x bf16", check=check(err, 2e-2)))
    report.rows.append(Row("fp8_gemm", shape, "torch bf16 matmul", ms_bf16, "TFLOP/s", tf_bf16, peaks[0]))
    if target:
        ms_ref = bench(lambda: ref.fp8_gemm(a, a_s, b, b_s), max(rep // 2, 20))
        report.rows.append(Row("fp8_gemm", shape, "torch reference", ms_ref, "TFLOP/s", flops / ms_ref / 1e9))
        ratio = tf_fp8 / tf_bf16
        report.targets.append((f"fp8_gemm at {shape}: >= 1.5x bf16 TFLOP/s", ratio >= 1.5, f"{ratio:.2f}x"))


def _speedup(report: Report, n: int) -> None:
    """Mark the first of the last n rows with its speedup over the second."""
    fast, base = report.rows[-n], report.rows[-n + 1]
    fast.speedup = f"{base.ms / fast.ms:.2f}x"


def case_moe(report: Report, peaks, rep: int) -> None:
    from duet.kernels import reference as ref
    from duet.kernels import triton_kernels as tk

    T, E, k, D, I = (MOE_SHAPE[n] for n in ("T", "E", "k", "D", "I"))
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16, generator=g)
    wg = torch.randn(E, I, D, device=DEV, dtype=torch.bfloat16, generator=g) / math.sqrt(D)
    wu = torch.randn(E, I, D, device=DEV, dtype=torch.bfloat16, generator=g) / math.sqrt(D)
    wd = torch.randn(E, D, I, device=DEV, dtype=torch.bfloat16, generator=g) / math.sqrt(I)
    scores = torch.randn(T, E, device=DEV, generator=g)
    top = scores.topk(k, dim=-1)
    ids, tw = top.indices, torch.softmax(top.values, dim=-1)
    active = int(ids.unique().numel())
    nbytes = active * 3 * I * D * 2 + T * D * 2 * 2
    flops = T * k * 3 * 2 * I * D
    err = rel_err(tk.fused_moe(x, wg, wu, wd, ids, tw), ref.fused_moe(x, wg, wu, wd, ids, tw))
    shape = f"T={T} E={E} top{k} D={D} I={I}"
    ms_tr = bench(lambda: tk.fused_moe(x, wg, wu, wd, ids, tw), rep)
    ms_ref = bench(lambda: ref.fused_moe(x, wg, wu, wd, ids, tw), rep)
    report.rows.append(Row("fused_moe", shape, "triton", ms_tr, "GB/s", nbytes / ms_tr / 1e6, peaks[2],
                           speedup=f"{ms_ref / ms_tr:.2f}x loop", check=check(err, 2e-2)))
    report.rows.append(Row("fused_moe", shape, "torch per-expert loop", ms_ref, "GB/s", nbytes / ms_ref / 1e6,
                           peaks[2]))
    report.rows[-2].metric = f"GB/s ({flops / ms_tr / 1e9:.0f} TFLOP/s)"
    report.targets.append((f"fused MoE at {shape}: >= 3x the per-expert loop", ms_ref / ms_tr >= 3.0,
                           f"{ms_ref / ms_tr:.2f}x"))


def case_mla(report: Report, peaks, rep: int) -> None:
    from duet.kernels import reference as ref
    from duet.kernels import triton_kernels as tk

    B, S, T, H, R, P = (MLA_SHAPE[n] for n in ("B", "S", "T", "H", "R", "P"))
    g = torch.Generator(device=DEV).manual_seed(1)
    dt = torch.bfloat16
    kv = torch.randn(B, T, R, device=DEV, dtype=dt, generator=g)
    kp = torch.randn(B, T, P, device=DEV, dtype=dt, generator=g)
    scale = 0.3 * (R + P) ** -0.5
    for label, lengths in (
        ("uniform", torch.full((B,), T, device=DEV, dtype=torch.int32)),
        ("ragged", torch.randint(1, T + 1, (B,), device=DEV, generator=g).to(torch.int32)),
    ):
        for s_new in (S, 2) if label == "uniform" else (S,):
            lengths = lengths.clamp_min(s_new)
            q = torch.randn(B, s_new, H, R, device=DEV, dtype=dt, generator=g)
            qp = torch.randn(B, s_new, H, P, device=DEV, dtype=dt, generator=g)
            total = int(lengths.sum())
            nbytes = total * (R + P) * 2 + 2 * q.numel() * 2 + qp.numel() * 2
            flops = 2 * s_new * H * total * (2 * R + P)
            out = tk.mla_decode(q, qp, kv, kp, lengths, scale)  # autotunes here
            err = rel_err(out, ref.mla_decode(q, qp, kv, kp, lengths, scale))
            shape = f"B={B} S={s_new} T={T} {label} H={H} R={R}"
            call = (q, qp, kv, kp, lengths, scale)
            ms_tr = bench(lambda call=call: tk.mla_decode(*call), rep)
            ms_ref = bench(lambda call=call: ref.mla_decode(*call), rep)
            gbs = nbytes / ms_tr / 1e6
            metric = f"GB/s ({flops / ms_tr / 1e9:.0f} TFLOP/s)"
            report.rows.append(Row("mla_decode", shape, "triton", ms_tr, metric, gbs, peaks[2],
                                   speedup=f"{ms_ref / ms_tr:.2f}x", check=check(err, 2e-2)))
            report.rows.append(Row("mla_decode", shape, "torch reference", ms_ref, "GB/s",
                                   nbytes / ms_ref / 1e6, peaks[2]))
            if label == "uniform" and s_new == S and peaks[2]:
                frac = gbs / (peaks[2] * 1000)
                report.targets.append((f"MLA decode at {shape}: >= 50% of HBM bandwidth", frac >= 0.5,
                                       f"{100 * frac:.0f}%"))


def edge_checks(report: Report) -> None:
    """The unit tests' awkward cases, on this device's compiled kernels: sizes that are not multiples of
    the blocks, a single token, experts without tokens, ragged and tiny lengths, NaN cache padding, one
    and several KV splits, strided cache views, S > 1."""
    from duet.kernels import reference as ref
    from duet.kernels import triton_kernels as tk

    g = torch.Generator(device=DEV).manual_seed(3)

    def rn(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, device=DEV, generator=g) * scale).to(dtype)

    def add(name, out, expect, tol):
        report.edge.append((name, rel_err(out, expect) if out.numel() else 0.0, tol))

    if DEV != "cuda" or torch.cuda.get_device_capability() >= (8, 9):
        for shape in ((5, 300), (1, 1), (17, 130)):
            x = rn(*shape, scale=3.0)
            y, sc = tk.act_quant(x)
            yr, sr = ref.act_quant(x)
            differ = float((y.view(torch.uint8) != yr.view(torch.uint8)).float().mean())
            report.edge.append((f"act_quant {shape} (fraction of fp8 bytes differing)", differ, 0.0))
            add(f"act_quant scales {shape}", sc, sr, 1e-6)
        w = rn(200, 300, scale=40.0).clamp(-448, 448).to(torch.float8_e4m3fn)
        ws = torch.rand(2, 3, device=DEV, generator=g) + 0.1
        for dt in (torch.float32, torch.bfloat16):
            add(f"weight_dequant 200x300 {dt}", tk.weight_dequant(w, ws, dtype=dt),
                ref.weight_dequant(w, ws, dtype=dt), 0.0)
        for ashape, n in (((5, 300), 150), ((2, 3, 256), 130)):
            a, a_s = ref.act_quant(rn(*ashape))
            b = rn(n, ashape[-1], scale=40.0).clamp(-448, 448).to(torch.float8_e4m3fn)
            b_s = torch.rand(-(-n // 128), -(-ashape[-1] // 128), device=DEV, generator=g) * 1e-2
            add(f"fp8_gemm {ashape}x{n}", tk.fp8_gemm(a, a_s, b, b_s, torch.float32),
                ref.fp8_gemm(a, a_s, b, b_s, torch.float32), 1e-5)

    for T, E, k, used, dt in ((1, 8, 6, 8, torch.bfloat16), (7, 8, 2, 5, torch.float32),
                              (40, 4, 3, 4, torch.bfloat16)):
        D, I = 96, 80
        x = rn(T, D, dtype=dt)
        wg, wu = rn(E, I, D, dtype=dt, scale=D**-0.5), rn(E, I, D, dtype=dt, scale=D**-0.5)
        wd = rn(E, D, I, dtype=dt, scale=I**-0.5)
        ids = torch.stack([torch.randperm(used, device=DEV, generator=g)[:k] for _ in range(T)])
        tw = torch.rand(T, k, device=DEV, generator=g)
        tol = 1e-5 if dt == torch.float32 else 2e-2
        add(f"fused_moe T={T} E={E} top{k} (experts>={used} idle) {str(dt)[6:]}",
            tk.fused_moe(x, wg, wu, wd, ids, tw), ref.fused_moe(x, wg, wu, wd, ids, tw), tol)

    for S, H, R, lengths, splits, dt in ((1, 4, 32, [70, 1, 33], 1, torch.float32),
                                        (1, 4, 32, [70, 1, 33], 3, torch.float32),
                                        (3, 3, 40, [70, 3, 17], None, torch.bfloat16),
                                        (2, 16, 512, [5], 4, torch.bfloat16)):
        B, P, T = len(lengths), 64, 70
        q, qp = rn(B, S, H, R, dtype=dt), rn(B, S, H, P, dtype=dt)
        buf = rn(B, T, R + P, dtype=dt)
        for b, n in enumerate(lengths):
            buf[b, n:] = float("nan")
        kv, kp = buf[..., :R], buf[..., R:]  # strided views of one cache
        lens = torch.tensor(lengths, device=DEV)
        tol = 1e-4 if dt == torch.float32 else 2e-2
        add(f"mla_decode S={S} H={H} R={R} lengths={lengths} splits={splits} {str(dt)[6:]}",
            tk.mla_decode(q, qp, kv, kp, lens, 0.1, num_splits=splits),
            ref.mla_decode(q, qp, kv, kp, lens, 0.1), tol)


# ------------------------------------------------------------------------------------------ output


def render(report: Report, device: str, peaks, elapsed: float) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a duet dependency, but keep the numbers printable without it
        Console = Table = None

    def fmt_peak(r: Row) -> tuple[str, str]:
        if r.peak is None or not math.isfinite(r.value):
            return "", ""
        unit = r.peak * 1000 if r.metric.startswith("GB/s") else r.peak
        return f"{unit:,.0f}", f"{100 * r.value / unit:.0f}%"

    headers = ["kernel", "shape", "impl", "time (us)", "achieved", "unit", "peak", "% peak", "speedup",
               "check"]
    lines = []
    for r in report.rows:
        peak, pct = fmt_peak(r)
        lines.append([r.kernel, r.shape, r.impl, f"{1000 * r.ms:,.1f}", f"{r.value:,.0f}", r.metric, peak,
                      pct, r.speedup, r.check])
    bf16, fp8, hbm = peaks
    title = (f"duet kernels on {device} (peaks: bf16 {bf16 or '?'} TFLOP/s, fp8 {fp8 or '?'} TFLOP/s, "
             f"HBM {hbm or '?'} TB/s)")
    if Table is not None:
        table = Table(title=title)
        for h in headers:
            right = h in ("time (us)", "achieved", "peak", "% peak")
            table.add_column(h, justify="right" if right else "left")
        for line in lines:
            table.add_row(*line)
        console = Console(width=200)
        console.print(table)
    else:
        print(title)
        print(" | ".join(headers))
        for line in lines:
            print(" | ".join(line))
    if report.edge:
        bad = [(n, e, t) for n, e, t in report.edge if not e <= t]
        print(f"\nEdge-case correctness (compiled kernels vs reference): {len(report.edge) - len(bad)}"
              f"/{len(report.edge)} ok")
        for n, e, t in bad:
            print(f"  FAIL {n}: error {e:.2e} > tolerance {t:.0e}")
    print("\nTargets:" if DEV == "cuda" else "\nTargets (not meaningful with --smoke):")
    for name, ok, value in report.targets:
        verdict = "n/a" if ok is None else ("PASS" if ok else "MISS")
        print(f"  [{verdict}] {name}: {value}")
    print(f"\n(total {elapsed:.0f} s; torch {torch.__version__}, triton {_triton_version()})")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "absent"


def _free() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="fp8,moe,mla", help="comma-separated subset of: fp8, moe, mla")
    parser.add_argument("--rep-ms", type=int, default=200, help="timed milliseconds per measurement")
    parser.add_argument("--peak-bf16", type=float, help="override the bf16 dense TFLOP/s peak")
    parser.add_argument("--peak-fp8", type=float, help="override the fp8 dense TFLOP/s peak")
    parser.add_argument("--peak-hbm", type=float, help="override the HBM bandwidth peak in TB/s")
    parser.add_argument("--no-edge", action="store_true", help="skip the edge-case correctness checks")
    parser.add_argument("--smoke", action="store_true",
                        help="no GPU needed: run this script on tiny shapes on the CPU with "
                             "TRITON_INTERPRET=1 (checks the script and the kernels, not their speed)")
    args = parser.parse_args(argv)

    if args.smoke:
        return smoke(args)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs CUDA: no CUDA device is visible, nothing to benchmark")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("benchmarks/kernels.py: unset TRITON_INTERPRET (the interpreter is for CPU tests)")
    try:
        import triton  # noqa: F401

        from duet.kernels import triton_kernels  # noqa: F401
    except Exception as exc:
        sys.exit(f"benchmarks/kernels.py needs Triton: {type(exc).__name__}: {exc}")

    device = torch.cuda.get_device_name()
    cap = torch.cuda.get_device_capability()
    peaks = peaks_for(device, args)
    return run(args, device, cap, peaks)


def smoke(args) -> int:
    global DEV
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--smoke needs TRITON_INTERPRET=1 before triton is imported")
    os.environ["TRITON_INTERPRET"] = "1"
    DEV = "cpu"
    globals().update({k: dict(v) for k, v in SMOKE_SHAPES.items()})
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    return run(args, "CPU (Triton interpreter, --smoke)", (9, 0), peaks_for("H200", args))


def run(args, device: str, cap: tuple[int, int], peaks) -> int:
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    report = Report()
    start = time.time()
    torch.manual_seed(0)
    if not args.no_edge:
        edge_checks(report)
    if "fp8" in wanted:
        if cap < (8, 9):
            report.targets.append(("fp8 kernels", None, f"need compute capability >= 8.9, have {cap}"))
        else:
            case_fp8(report, peaks, args.rep_ms)
            _free()
    if "moe" in wanted:
        case_moe(report, peaks, args.rep_ms)
        _free()
    if "mla" in wanted:
        case_mla(report, peaks, args.rep_ms)
    render(report, device, peaks, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
