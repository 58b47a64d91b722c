"""duet's hand-written kernels for the DeepSeek-V3 hot paths, behind a backend dispatcher.

Each public function has a Triton implementation (:mod:`duet.kernels.triton_kernels`) and a plain-torch
reference with the same signature (:mod:`duet.kernels.reference`).  Which one runs is decided at call
time by the ``DUET_KERNELS`` environment variable:

``auto`` (default)
    Triton when the input tensor is on CUDA and Triton imports, the torch reference otherwise.
``triton``
    Always Triton, e.g. on a CPU with ``TRITON_INTERPRET=1`` (that is how the tests check the kernels).
``torch``
    Always the reference.

Importing this package never imports Triton; it is loaded on the first call that needs it, so duet
works where Triton is absent (macOS, Windows).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor

from . import reference

ENV_VAR = "DUET_KERNELS"
BACKENDS = ("auto", "triton", "torch")

__all__ = [
    "ENV_VAR",
    "BACKENDS",
    "FP8_KERNELS",
    "act_quant",
    "weight_dequant",
    "fp8_gemm",
    "fused_moe",
    "mla_decode",
    "backend_for",
    "fp8_native",
    "requested_backend",
    "triton_available",
    "describe",
]


def requested_backend() -> str:
    """The value of ``DUET_KERNELS`` (``auto`` when unset), validated."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} is not valid; expected one of {', '.join(BACKENDS)}"
        )
    return value


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    """None when Triton (and duet's kernels) import, otherwise the reason they do not."""
    try:
        import triton  # noqa: F401

        from . import triton_kernels  # noqa: F401
    except Exception as exc:  # ImportError, or a broken Triton install raising something else
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    """Whether Triton and duet's Triton kernels import in this environment (imports Triton if so)."""
    return _triton_import_error() is None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# Kernels that use FP8 (e4m3) in Triton need compute capability 8.9+ (Ada, Hopper, Blackwell).
FP8_KERNELS = frozenset({"act_quant", "weight_dequant", "fp8_gemm"})


def _fp8_capable(tensor: Tensor | None) -> bool:
    if tensor is not None and not tensor.is_cuda:
        return True  # the interpreter
    if not torch.cuda.is_available():
        return True
    device = tensor.device if tensor is not None else None
    return torch.cuda.get_device_capability(device) >= (8, 9)


def backend_for(tensor: Tensor | None = None, kernel: str | None = None) -> str:
    """``"triton"`` or ``"torch"``: the backend ``kernel`` (any kernel when None) called on ``tensor``
    would use now.

    With ``DUET_KERNELS=auto`` Triton is chosen only for CUDA tensors, only if Triton imports, and for the
    FP8 kernels only on compute capability 8.9+.  With ``DUET_KERNELS=triton`` Triton is forced; if it
    cannot run, this raises a RuntimeError saying why.  ``tensor=None`` asks about the default CUDA
    device when there is one.
    """
    req = requested_backend()
    if req == "torch":
        return "torch"
    if req == "triton":
        err = _triton_import_error()
        if err is not None:
            raise RuntimeError(f"{ENV_VAR}=triton but Triton kernels are unavailable ({err})")
        if tensor is not None and tensor.device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"{ENV_VAR}=triton with a tensor on {tensor.device.type}: Triton needs CUDA, "
                "or TRITON_INTERPRET=1 set before Triton is first imported"
            )
        if kernel in FP8_KERNELS and not _fp8_capable(tensor):
            raise RuntimeError(f"{ENV_VAR}=triton: the Triton {kernel} needs FP8 (compute capability 8.9+)")
        return "triton"
    on_cuda = tensor.is_cuda if tensor is not None else torch.cuda.is_available()
    if on_cuda and _triton_import_error() is None and (kernel not in FP8_KERNELS or _fp8_capable(tensor)):
        return "triton"
    return "torch"


def fp8_native(device: str | torch.device) -> bool:
    """Whether ``act_quant`` and ``fp8_gemm`` run as Triton kernels on ``device``: CUDA with compute capability
    8.9+ and Triton (unless ``DUET_KERNELS=torch``). Where they do, FP8 weights pay for themselves on the hot path;
    elsewhere the references dequantise them block by block on every call."""
    device = torch.device(device)
    if device.type != "cuda" or requested_backend() == "torch":
        return False
    return _triton_import_error() is None and _fp8_capable(torch.empty(0, device=device))


def describe() -> str:
    """One line for ``duet doctor``: requested and effective backend, and why."""
    try:
        req = requested_backend()
    except ValueError as exc:
        return str(exc)
    cuda = torch.cuda.is_available()
    if req == "torch":
        return f"{ENV_VAR}=torch: torch reference kernels"
    err = _triton_import_error() if (cuda or req == "triton") else None
    if req == "triton":
        if err:
            return f"{ENV_VAR}=triton but Triton is unavailable ({err})"
        where = "CUDA" if cuda else ("the Triton interpreter" if _interpreting() else "no CUDA device")
        return f"{ENV_VAR}=triton: Triton kernels on {where}"
    if not cuda:
        return f"{ENV_VAR}=auto: torch reference kernels (no CUDA device)"
    if err:
        return f"{ENV_VAR}=auto: torch reference kernels (Triton unavailable: {err})"
    return f"{ENV_VAR}=auto: Triton kernels on {torch.cuda.get_device_name()}"


def _impl(name: str, tensor: Tensor) -> Any:
    # The Triton kernels have no backward: what autograd records (training) runs the reference.
    if backend_for(tensor, name) == "triton" and not (torch.is_grad_enabled() and tensor.requires_grad):
        from . import triton_kernels

        return getattr(triton_kernels, name)
    return getattr(reference, name)


def act_quant(x: Tensor, block_size: int = 128) -> tuple[Tensor, Tensor]:
    """Per-token, per-``block_size``-channel FP8 (e4m3) quantisation.

    ``x [..., K]`` (K may be a non-multiple of ``block_size``) -> ``(y float8_e4m3fn [..., K],
    s float32 [..., ceil(K/block_size)])`` with ``x ~= y * s`` per group; ``s = max(amax, 1e-12)/448``.
    """
    return _impl("act_quant", x)(x, block_size)


def weight_dequant(
    w: Tensor, scale_inv: Tensor, block_size: int = 128, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``w float8_e4m3fn [M, N]``, ``scale_inv float32 [ceil(M/b), ceil(N/b)]`` -> ``w * scale`` per
    ``block_size x block_size`` tile, as ``dtype [M, N]``."""
    return _impl("weight_dequant", w)(w, scale_inv, block_size, dtype)


def fp8_gemm(
    a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """``a fp8 [..., K]`` with ``a_s [..., ceil(K/128)]`` (from :func:`act_quant`), ``b fp8 [N, K]`` with
    ``b_s [ceil(N/128), ceil(K/128)]`` -> ``[..., N] = a @ b.T`` with fp32 accumulation."""
    return _impl("fp8_gemm", a)(a, a_s, b, b_s, out_dtype)


def fused_moe(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, topk_ids: Tensor, topk_weights: Tensor,
    *, dense: bool | None = None,
) -> Tensor:
    """Routed SwiGLU experts: ``x [T, D]``, ``w_gate, w_up [E, I, D]``, ``w_down [E, D, I]``,
    ``topk_ids [T, k]``, ``topk_weights [T, k]`` -> ``[T, D] = sum_j w[t, j] * down_e(silu(gate_e x) *
    up_e x)``.

    ``dense`` (default: while ``torch.compile`` traces) makes the reference run every expert with a routing
    matrix instead of grouping tokens by expert on the host; the Triton kernel never syncs and ignores it.
    """
    impl = _impl("fused_moe", x)
    if impl is reference.fused_moe:
        dense = torch.compiler.is_compiling() if dense is None else dense
        return impl(x, w_gate, w_up, w_down, topk_ids, topk_weights, dense=dense)
    return impl(x, w_gate, w_up, w_down, topk_ids, topk_weights)


def mla_decode(
    q_latent: Tensor, q_pe: Tensor, kv_latent: Tensor, k_pe: Tensor, lengths: Tensor, softmax_scale: float,
    *, trim: bool = True,
) -> Tensor:
    """Absorbed MLA attention over the latent cache for the newest ``S`` tokens of each row.

    ``q_latent [B, S, H, R]``, ``q_pe [B, S, H, P]``, ``kv_latent [B, T, R]``, ``k_pe [B, T, P]``,
    ``lengths [B]`` (valid cache length including the S new tokens) -> ``[B, S, H, R]``; query ``s`` of
    row ``b`` attends to positions ``0..lengths[b]-S+s``; ``softmax_scale`` includes the YaRN mscale^2.
    ``trim=False``: the reference attends over all T positions with no host sync (for ``torch.compile``);
    the Triton kernel never syncs and ignores it.
    """
    impl = _impl("mla_decode", q_latent)
    if impl is reference.mla_decode:
        return impl(q_latent, q_pe, kv_latent, k_pe, lengths, softmax_scale, trim=trim)
    return impl(q_latent, q_pe, kv_latent, k_pe, lengths, softmax_scale)
