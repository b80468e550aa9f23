"""Products of layouts with per-group offsets: ``w = (u - zero) * scale - offset`` (llama.cpp's q4_1, q5_1,
q4_K, q5_K; ``ggml_layout.GroupOffsets``).

The GEMV / matmul kernels compute the ``(u - zero) * scale`` part (their codes stay exact small integers
on the tensor cores). The offset part of output ``[m, n]`` is ``sum_g S[m, g] * offset[n, g]``, with
``S[m, g]`` the sum of token ``m``'s activations over group ``g``: one small kernel computes it and
subtracts it from the main product. Both are kept in float32 until then: the two terms cancel in part
(``d * q`` is never negative where ``w`` is centred), so rounding the main product to 16 bits first would
cost precision. At the decode step the main product's split-K partials (``kernels/partials.py``) take the
correction in their first plane, and the consumer sums them as usual.

Prompt-sized products: the fused prompt GEMM with the same correction (up to ``EngineOptions.prompt_gemm_max_m``
tokens), else the dequantized slabs of ``dequant.py``, which subtract each weight's offset themselves (the
slab then holds llama.cpp's weights, rounded to the compute dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantbench.engine.kernels.layouts import WQLayout
from quantbench.engine.kernels.partials import Partials
from quantbench.engine.kernels.pdl import launch_args, wait_prior
from quantbench.engine.kernels.routing import Route
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions

__all__ = ["offset_linear", "subtract_offsets"]


@triton.jit
def _subtract_offsets_kernel(
    acc_ptr, x_ptr, v_ptr, s_ptr, o_ptr, N, G, stride_acc, stride_x, stride_o, stride_v, stride_s,
    GROUP: tl.constexpr, SUB: tl.constexpr, SCALED: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """``o[m, n] = acc[m, n] - sum_g (sum of x[m] over group g) * offset[n, g]``; program = (row tile, token).
    ``offset = v`` (float) or ``s[n, g // SUB] * v`` (SCALED), in float32."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)
    m = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, GROUP)
    wait_prior(PDL)
    corr = tl.zeros((BN,), dtype=tl.float32)
    for g0 in range(0, G, BG):
        gs = g0 + tl.arange(0, BG)
        mask_g = gs < G
        xg = tl.load(
            x_ptr + m * stride_x + gs[:, None] * GROUP + offs_c[None, :], mask=mask_g[:, None], other=0.0
        )
        sums = tl.sum(xg.to(tl.float32), axis=1)  # [BG]
        mask = mask_n[:, None] & mask_g[None, :]
        off = tl.load(v_ptr + rows[:, None] * stride_v + gs[None, :], mask=mask, other=0).to(tl.float32)
        if SCALED:
            sidx = rows[:, None] * stride_s + (gs // SUB)[None, :]
            off = tl.load(s_ptr + sidx, mask=mask, other=0).to(tl.float32) * off
        corr += tl.sum(off * sums[None, :], axis=1)
    acc = tl.load(acc_ptr + m * stride_acc + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(o_ptr + m * stride_o + offs_n, (acc - corr).to(o_ptr.dtype.element_ty), mask=mask_n)


def subtract_offsets(
    layout: WQLayout, x: torch.Tensor, acc: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``out = acc - offset term`` for the product of ``x [M, K]``; ``acc [M, N]`` float32 (may be ``out``
    itself). ``out`` defaults to a new tensor of x's dtype."""
    offsets = layout.offsets
    m, n = x.shape[0], layout.out_features
    if out is None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    values, scale = offsets.values, offsets.scale
    bn = 64
    _subtract_offsets_kernel[(triton.cdiv(n, bn), m)](
        acc, x, values, scale if scale is not None else values, out,
        n, values.shape[1], acc.stride(0), x.stride(0), out.stride(0), values.stride(0),
        scale.stride(0) if scale is not None else 0,
        GROUP=layout.group, SUB=offsets.sub, SCALED=scale is not None, BN=bn, BG=32, num_warps=4,
        **launch_args(x.device),
    )  # fmt: skip
    return out


def offset_linear(
    route: Route,
    layout: WQLayout,
    x: torch.Tensor,
    act_silu_mul: bool = False,
    out: torch.Tensor | None = None,
    partials: bool = False,
    options: EngineOptions = DEFAULT_OPTIONS,
) -> torch.Tensor | Partials:
    """``kernels.run_route`` for a layout with offsets (same arguments): the routed kernel's product in
    float32, then :func:`subtract_offsets`. The slabs subtract the offsets themselves; the tensor-core
    GEMV takes the correction in its first split-K plane; the half2 GEMV (16-bit output) is not used."""
    from quantbench.engine.kernels import run_kernel
    from quantbench.engine.kernels.routing import Kernel

    if act_silu_mul:
        from quantbench.engine.kernels.fused import silu_mul

        x = silu_mul(x, options=options)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, n = x.shape[0], layout.out_features
    if route.kernel is Kernel.SLABS:
        return run_kernel(route, layout, x, out=out, options=options)
    if route.kernel is Kernel.MMA_GEMV and partials and options.partials and out is None:
        parts = run_kernel(route, layout, x, partials=True, options=options)  # Partials: mma_gemv's rule
        subtract_offsets(layout, x, parts.parts[0], parts.parts[0])
        return parts
    if route.kernel is not Kernel.PROMPT_GEMM:
        route = Route(Kernel.WQ_MATMUL, route.act)
    acc = torch.empty((m, n), device=x.device, dtype=torch.float32)
    return subtract_offsets(layout, x, run_kernel(route, layout, x, out=acc, options=options), out)
