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

from quantbench.engine.kernels.layouts import ACT_BY_NAME, ACT_NONE, WQLayout, layout_for
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions

__all__ = ["WQLayout", "dispatch", "layout_for", "linear", "triton_available"]


@functools.cache
def triton_available() -> bool:
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


def dense_enabled(x: torch.Tensor, layout: WQLayout, options: EngineOptions = DEFAULT_OPTIONS) -> bool:
    """Whether ``linear`` takes a prompt path (fused dequantize-GEMM or slabs; CUDA, prompt-sized M)."""
    if options.prompt_kernel == "wq_matmul" or not x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    from quantbench.engine.kernels.dequant import dense_supported

    return dense_supported(layout, x.shape[0])


def linear(
    layout: WQLayout,
    x: torch.Tensor,
    act_silu_mul: bool = False,
    out: torch.Tensor | None = None,
    partials: bool = False,
    options: EngineOptions = DEFAULT_OPTIONS,
):
    """Kernel forward of a quantized layer on 2-D ``x`` (``[M, 2K]`` gate/up when ``act_silu_mul``).

    ``partials`` (no ``out``): a tensor-core GEMV may return its split-K partials (``kernels/partials.py``)
    instead of the summed tensor."""
    from quantbench.engine.kernels.wq_matmul import wq_matmul

    if dense_enabled(x, layout, options):  # prompt sizes: fused dequantize-GEMM, or L2 slabs + cuBLAS
        from quantbench.engine.kernels.dequant import dense_matmul
        from quantbench.engine.kernels.prompt_gemm import prompt_gemm, prompt_supported

        if act_silu_mul:
            from quantbench.engine.kernels.fused import silu_mul

            x = silu_mul(x, options=options)
        rf = None
        if layout.act_quant != ACT_NONE:
            from quantbench.engine.kernels.fused import act_quant

            x, rf = act_quant(x, layout.act_quant, layout.threshold, False, layout.in_features, options)
        fused = options.prompt_kernel == "prompt_gemm" and x.shape[0] <= options.prompt_gemm_max_m
        if fused and prompt_supported(layout, x, options):
            return prompt_gemm(x, layout, row_factor=rf, out=out, options=options)
        return dense_matmul(x, layout, row_factor=rf, out=out, options=options)
    if layout.act_quant == ACT_NONE:
        return wq_matmul(x, layout, act_silu_mul=act_silu_mul, out=out, partials=partials, options=options)
    gemv_quantizes = {ACT_BY_NAME[name] for name in options.mma_quantizes}
    if x.shape[0] == 1 and layout.act_quant in gemv_quantizes:
        from quantbench.engine.kernels.mma_gemv import mma_gemv, mma_supported

        if mma_supported(x, layout, options):  # one token: the GEMV quantizes the activations itself
            return mma_gemv(
                x,
                layout,
                act_silu_mul=act_silu_mul,
                out=out,
                quantize_act=True,
                partials=partials,
                options=options,
            )
    from quantbench.engine.kernels.fused import act_quant

    xe, rf = act_quant(x, layout.act_quant, layout.threshold, act_silu_mul, layout.in_features, options)
    if out is None and not partials:
        out = torch.empty((x.shape[0], layout.out_features), device=x.device, dtype=x.dtype)
    return wq_matmul(xe, layout, row_factor=rf, out=out, partials=partials, options=options)


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
