"""Triton kernels for quantized linears and the fused decode step.

``linear(layout, x)`` runs a quantized layer's product with the kernel ``routing.py`` picks (the one
routing table); ``dispatch(module, x)`` is the entry point a ``QuantLinear.forward`` reaches on CUDA
(registered as ``quant.base.kernel_forward``): the kernel's output, or ``None`` when no kernel handles
this module / input (the caller then runs its reference forward). Nothing here imports Triton until a
kernel is needed, so CPU-only installs work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from quantbench.engine.kernels.layouts import WQLayout, layout_for
from quantbench.engine.kernels.routing import (
    ActQuant,
    Kernel,
    Operands,
    Route,
    route_for,
    route_forward,
    triton_available,
)
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions

if TYPE_CHECKING:
    from quantbench.engine.kernels.fused import OutlierColumns

__all__ = ["WQLayout", "dispatch", "layout_for", "linear", "run_kernel", "run_route", "triton_available"]


def linear(
    layout: WQLayout,
    x: torch.Tensor,
    act_silu_mul: bool = False,
    out: torch.Tensor | None = None,
    partials: bool = False,
    options: EngineOptions = DEFAULT_OPTIONS,
    outliers: OutlierColumns | None = None,
):
    """Kernel forward of a quantized layer on 2-D ``x`` (``[M, 2K]`` gate/up when ``act_silu_mul``), by the
    kernel ``routing.route_linear`` picks.

    ``partials`` (no ``out``): a tensor-core GEMV may return its split-K partials (``kernels/partials.py``)
    instead of the summed tensor. ``outliers``: LLM.int8's outlier columns of x, recorded by the kernel that
    wrote it (``fused.outlier_columns``)."""
    return run_route(route_for(x, layout, options), layout, x, act_silu_mul, out, partials, options, outliers)


def run_route(
    route: Route,
    layout: WQLayout,
    x: torch.Tensor,
    act_silu_mul: bool = False,
    out: torch.Tensor | None = None,
    partials: bool = False,
    options: EngineOptions = DEFAULT_OPTIONS,
    outliers: OutlierColumns | None = None,
):
    """Run a quantized layer's product the way ``route`` says (arguments as :func:`linear`)."""
    if layout.offsets is not None:  # w = scale * code - offset (llama.cpp's q4_1, q5_1, q4_K, q5_K)
        from quantbench.engine.kernels.offsets import offset_linear

        return offset_linear(route, layout, x, act_silu_mul, out, partials, options)
    return run_kernel(route, layout, x, act_silu_mul, out, partials, options, outliers)


def run_kernel(
    route: Route,
    layout: WQLayout,
    x: torch.Tensor,
    act_silu_mul: bool = False,
    out: torch.Tensor | None = None,
    partials: bool = False,
    options: EngineOptions = DEFAULT_OPTIONS,
    outliers: OutlierColumns | None = None,
):
    """The routed kernel itself (for layouts with offsets: the ``(u - zero) * scale`` part alone)."""
    kernel, act = route
    k = layout.in_features
    if kernel is Kernel.W8A8_GEMM:
        from quantbench.engine.kernels.w8a8_gemm import w8a8_product

        return w8a8_product(x, layout, act_silu_mul, out, options)
    if kernel in (Kernel.PROMPT_GEMM, Kernel.SLABS):  # prompt sizes: SiLU-gate and quantize x first
        rf = None
        if act_silu_mul:
            from quantbench.engine.kernels.fused import outlier_columns, silu_mul

            # the SiLU-gate writes the product's input: it records the outlier columns
            outliers = outlier_columns(x.shape[0], layout, x.device, options) if act is ActQuant.LAUNCH else None
            x = silu_mul(x, options=options, outliers=outliers)
        if act is ActQuant.LAUNCH:
            from quantbench.engine.kernels.fused import act_quant

            fold = kernel is Kernel.SLABS and options.slab_fold_scales
            x, rf = act_quant(x, layout.act_quant, layout.threshold, False, k, options, fold=fold, outliers=outliers)
            rf = None if fold else rf
        if kernel is Kernel.PROMPT_GEMM:
            from quantbench.engine.kernels.prompt_gemm import prompt_gemm

            return prompt_gemm(x, layout, row_factor=rf, out=out, options=options)
        from quantbench.engine.kernels.dequant import dense_matmul

        return dense_matmul(x, layout, row_factor=rf, out=out, options=options)
    if act is ActQuant.IN_GEMV:  # one token: the GEMV quantizes the activations itself
        from quantbench.engine.kernels.mma_gemv import mma_gemv

        return mma_gemv(
            x,
            layout,
            act_silu_mul=act_silu_mul,
            out=out,
            quantize_act=True,
            partials=partials,
            options=options,
        )
    rf = None
    if act is ActQuant.LAUNCH:
        from quantbench.engine.kernels.fused import act_quant

        m = x.shape[0]
        x, rf = act_quant(x, layout.act_quant, layout.threshold, act_silu_mul, k, options, outliers=outliers)
        act_silu_mul = False
        if out is None and not partials:
            out = torch.empty((m, layout.out_features), device=x.device, dtype=x.dtype)
    if kernel is Kernel.MMA_GEMV:
        from quantbench.engine.kernels.mma_gemv import mma_gemv

        return mma_gemv(
            x, layout, act_silu_mul=act_silu_mul, row_factor=rf, out=out, partials=partials, options=options
        )
    if kernel is Kernel.GEMV_H2:
        from quantbench.engine.kernels.gemv_h2 import gemv_h2

        return gemv_h2(x, layout, act_silu_mul=act_silu_mul, row_factor=rf, out=out, options=options)
    from quantbench.engine.kernels.wq_matmul import wq_matmul

    return wq_matmul(x, layout, act_silu_mul=act_silu_mul, row_factor=rf, out=out, options=options)


def act_quant_torch(
    x: torch.Tensor, kind: int, threshold: float, act_silu_mul: bool, k: int, fold: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of ``fused.act_quant``: quantized activations (model dtype; ``fold``: times their
    factor) and per-token factors."""
    from quantbench.engine.kernels.layouts import ACT_FP8, ACT_LLM_INT8

    if act_silu_mul:
        x = torch.nn.functional.silu(x[:, :k]) * x[:, k:]
    xf = x.float()
    ax = xf.abs()
    if kind == ACT_LLM_INT8:
        outlier = (ax >= threshold).any(dim=0) if threshold > 0 else torch.zeros_like(ax[0], dtype=torch.bool)
        amax = ax.masked_fill(outlier, 0.0).amax(dim=1)
        zero = amax == 0
        # ``quantize_int8_rows``' factor: torch's ``127 / t`` is ``t.reciprocal() * 127``
        inv = torch.where(zero, torch.ones_like(amax), 127.0 / amax)
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
    if fold:
        q = q * rf[:, None]
    return q.to(x.dtype), rf.float().contiguous()


def dispatch(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Kernel forward of ``module`` for ``x [..., K]`` (``routing.route_forward``, default options), or None
    (use the reference forward). The engine registers it as the quantized layers' ``kernel_forward``."""
    layout = layout_for(module)
    x2 = x if layout is None else x.reshape(-1, layout.in_features)
    route = route_forward(
        x2.shape[0],
        layout,
        x.dtype,
        getattr(module, "compute_dtype", x.dtype),
        torch.is_grad_enabled() and x.requires_grad,
        Operands(x2, layout, DEFAULT_OPTIONS),
    )
    if route.kernel is Kernel.REFERENCE:
        return None
    out = run_route(route, layout, x2)
    return out.reshape(*x.shape[:-1], layout.out_features)
