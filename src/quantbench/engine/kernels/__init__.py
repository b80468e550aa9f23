"""Triton kernels for quantized linears and the fused decode step.

``dispatch(module, x)`` is the one entry point a ``QuantLinear.forward`` calls on CUDA: it returns the
kernel's output, or ``None`` when no kernel handles this module / input (the caller then runs its
reference forward). Nothing here imports Triton until a kernel is needed, so CPU-only installs work.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from quantbench.engine.kernels.layouts import ACT_NONE, MMA_POLICY, WQLayout, layout_for

__all__ = ["WQLayout", "dispatch", "layout_for", "linear", "triton_available"]


@functools.cache
def triton_available() -> bool:
    if os.environ.get("QUANTBENCH_NO_TRITON"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_enabled(x: torch.Tensor) -> bool:
    """Triton kernels run for CUDA tensors (or anywhere under TRITON_INTERPRET=1, for tests)."""
    if not triton_available():
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def dense_enabled(x: torch.Tensor, layout: WQLayout) -> bool:
    """Whether ``linear`` takes the dequantize-slab + cuBLAS path (CUDA, prompt-sized M)."""
    if DENSE_DISABLED["off"] or not x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    from quantbench.engine.kernels.dequant import dense_supported

    return dense_supported(layout, x.shape[0])


DENSE_DISABLED = {"off": bool(os.environ.get("QUANTBENCH_NO_DENSE"))}


def linear(
    layout: WQLayout,
    x: torch.Tensor,
    act_silu_mul: bool = False,
    out: torch.Tensor | None = None,
    partials: bool = False,
):
    """Kernel forward of a quantized layer on 2-D ``x`` (``[M, 2K]`` gate/up when ``act_silu_mul``).

    ``partials`` (no ``out``): a tensor-core GEMV may return its split-K partials (``kernels/partials.py``)
    instead of the summed tensor."""
    if layout.offsets is not None:  # w = scale * code - offset (llama.cpp's q4_1, q4_K, ...)
        from quantbench.engine.kernels.offsets import offset_linear

        return offset_linear(layout, x, act_silu_mul=act_silu_mul, out=out, partials=partials)
    from quantbench.engine.kernels.wq_matmul import wq_matmul

    if dense_enabled(x, layout):  # prompt sizes: fused dequantize-GEMM, or L2 slabs + cuBLAS
        from quantbench.engine.kernels.dequant import dense_matmul
        from quantbench.engine.kernels.prompt_gemm import PROMPT_PATH, prompt_gemm, prompt_supported

        if act_silu_mul:
            from quantbench.engine.kernels.fused import silu_mul

            x = silu_mul(x)
        rf = None
        if layout.act_quant != ACT_NONE:
            from quantbench.engine.kernels.fused import act_quant

            x, rf = act_quant(x, layout.act_quant, layout.threshold, False, layout.in_features)
        fused = PROMPT_PATH["path"] == "fused" and x.shape[0] <= PROMPT_PATH["max_m"]
        if fused and prompt_supported(layout, x):
            return prompt_gemm(x, layout, row_factor=rf, out=out)
        return dense_matmul(x, layout, row_factor=rf, out=out)
    if layout.act_quant == ACT_NONE:
        return wq_matmul(x, layout, act_silu_mul=act_silu_mul, out=out, partials=partials)
    if x.shape[0] == 1 and layout.act_quant in MMA_POLICY["act"]:
        from quantbench.engine.kernels.mma_gemv import mma_gemv, mma_supported

        if mma_supported(x, layout):  # one token: the GEMV quantizes the activations itself
            return mma_gemv(
                x, layout, act_silu_mul=act_silu_mul, out=out, quantize_act=True, partials=partials
            )
    from quantbench.engine.kernels.fused import act_quant

    xe, rf = act_quant(x, layout.act_quant, layout.threshold, act_silu_mul, layout.in_features)
    if out is None and not partials:
        out = torch.empty((x.shape[0], layout.out_features), device=x.device, dtype=x.dtype)
    return wq_matmul(xe, layout, row_factor=rf, out=out, partials=partials)


def act_quant_torch(
    x: torch.Tensor, kind: int, threshold: float, act_silu_mul: bool, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of ``fused.act_quant``: quantized activations (model dtype) and per-token factors."""
    from quantbench.engine.kernels.layouts import ACT_FP8, ACT_LLM_INT8

    if act_silu_mul:
        x = torch.nn.functional.silu(x[:, :k]) * x[:, k:]
    xf = x.float()
    ax = xf.abs()
    if kind == ACT_LLM_INT8:
        outlier = (ax >= threshold).any(dim=0) if threshold > 0 else torch.zeros_like(ax[0], dtype=torch.bool)
        amax = ax.masked_fill(outlier, 0.0).amax(dim=1)
        zero = amax == 0
        # tensor / tensor: torch's CPU scalar / tensor multiplies by a reciprocal (not correctly rounded)
        inv = torch.where(zero, torch.ones_like(amax), torch.full_like(amax, 127.0) / amax)
        rf = torch.where(zero, torch.ones_like(amax), amax / 127.0)
        scaled = xf * inv[:, None]
        q = torch.where(outlier, scaled, torch.round(scaled).clamp(-127, 127))
    elif kind == ACT_FP8:
        scale = ax.amax(dim=1) / 448.0
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = (xf / safe[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).float()
        rf = scale
    else:
        safe = (ax.amax(dim=1) / 127.0).clamp_min(1e-8)
        q = torch.round(xf / safe[:, None]).clamp(-127, 127)
        rf = safe
    return q.to(x.dtype), rf.float().contiguous()


def dispatch(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Kernel forward of ``module`` for ``x [..., K]``, or None (use the reference forward)."""
    if not kernels_enabled(x) or x.dtype not in (torch.float16, torch.bfloat16):
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None  # the kernels have no backward: training (QLoRA) takes the autograd reference path
    if getattr(module, "compute_dtype", x.dtype) != x.dtype:
        return None
    layout = layout_for(module)
    if layout is None:
        return None
    x2 = x.reshape(-1, layout.in_features)
    from quantbench.engine.kernels.wq_matmul import pick_config

    if not pick_config(x2.shape[0], layout.out_features, layout.in_features, layout.bits, layout.group):
        return None
    out = linear(layout, x2)
    return out.reshape(*x.shape[:-1], layout.out_features)
