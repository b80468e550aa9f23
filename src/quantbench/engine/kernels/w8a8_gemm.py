"""W8A8 products (LLM.int8, SmoothQuant, fp8) of many tokens on 8-bit tensor cores.

Why: the slab path (``dequant.dense_matmul``) writes every weight as 16 bits before cuBLAS multiplies
16-bit activations by it; 8-bit x 8-bit products are what these methods define (int8 x int8 with int32
sums: ``quant.llm_int8.llm_int8_matmul``, ``SmoothQuantLinear.forward``; e4m3 x e4m3 with fp32 sums:
``quant.fp8.fp8_linear``) and run at twice the 16-bit rate. Here the activations are quantized to codes
(``fused.act_codes``), one Triton program multiplies a ``[BM, BN]`` output tile from the codes as the
engine stores them (row-major, or tile-major for the tensor-core GEMV: a ``[16 rows, 64 bytes]`` tile is
one contiguous KiB) and scales the sums in its epilogue, in the order of each method's reference:

* LLM.int8 without outlier decomposition (threshold 0): ``acc * (rf[m] * (absmax[n] / 127))`` plus the
  bias. With a threshold its products stay on the slabs: which columns are outliers is data, and their
  16-bit product, gathered column by column on the GPU, cost far more than the 8-bit product saves.
* SmoothQuant: ``(acc * rf[m]) * wscale[n]`` plus the bias.
* fp8: ``acc * (rf[m] * wscale[n])`` plus the bias (``fp8_matmul_reference``); e4m3 tensor cores need
  sm_89+. On Hopper their running sums keep about 14 bits, not fp32's 24; ``EngineOptions.w8a8_fp8_mma``
  "fp16" widens the codes to fp16 instead (exact) for exact products summed in fp32, at half the rate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantbench.engine.kernels.layouts import ACT_FP8, ACT_LLM_INT8, CODE_DTYPE_OF_ACT, WQLayout
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions

__all__ = ["col_scale", "w8a8_gemm", "w8a8_product"]


def weight_codes(layout: WQLayout) -> torch.Tensor:
    """The layout's 8-bit weight codes as stored (int8, or float8_e4m3fn for fp8)."""
    return layout.w32.view(CODE_DTYPE_OF_ACT[layout.act_quant])


@triton.jit
def _code_offsets(rows, ks, K, stride_wn, TN: tl.constexpr, TKB: tl.constexpr):
    """Byte offsets of the weight codes at (output ``rows`` [BN, 1], input columns ``ks`` [1, BK]): row-major
    with ``stride_wn`` bytes per row (TN == 0) or tile-major ``[N / TN, K / TKB, TN, TKB]``."""
    if TN == 0:
        return rows * stride_wn + ks
    return (rows // TN) * (K // TKB) * (TN * TKB) + (ks // TKB) * (TN * TKB) + (rows % TN) * TKB + ks % TKB


@triton.jit(do_not_specialize=["M"])
def _w8a8_gemm_kernel(
    x_ptr, w_ptr, rf_ptr, cs_ptr, b_ptr, o_ptr, M, N, K, stride_xm, stride_wn, stride_om, TN: tl.constexpr,
    TKB: tl.constexpr, FP8: tl.constexpr, PAIR_FIRST: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, FP8_MMA: tl.constexpr,
):  # fmt: skip
    """``o = acc * factors (+ bias)`` for ``acc = x_codes [M, K] @ w_codes [N, K]^T``: int8 codes
    summed in int32, or (FP8) e4m3 codes summed in fp32.

    Codes of w are bytes (``_code_offsets``); BK is a multiple of TKB, so a K step moves every offset by
    the same amount. Output tiles are visited GROUP_M token tiles at a time per weight tile (its codes stay
    in L2).
    """
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)[:, None]
    offs_k = tl.arange(0, BK)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + _code_offsets(rows, offs_k[None, :], K, stride_wn, TN, TKB)
    W_STEP: tl.constexpr = BK * (TN + (TN == 0))  # a K step: BK bytes of a row, or BK / TKB whole tiles
    if FP8:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        kmask = (k0 + offs_k) < K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_n[:, None] & kmask[None, :], other=0.0)
        if FP8 and FP8_MMA:  # e4m3 tensor cores: sums in their own accumulator, narrower than fp32
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.float32)
        elif FP8:  # codes widened to fp16 (exactly): exact products, fp32 sums
            acc = tl.dot(a.to(tl.float16), tl.trans(b).to(tl.float16), acc, out_dtype=tl.float32)
        else:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        x_ptrs += BK
        w_ptrs += W_STEP
    rf = tl.load(rf_ptr + offs_m, mask=mask_m, other=0.0)
    cs = tl.load(cs_ptr + offs_n, mask=mask_n, other=0.0)
    if PAIR_FIRST:  # LLM.int8, fp8: acc * (sx * sw)
        v = acc.to(tl.float32) * (rf[:, None] * cs[None, :])
    else:  # SmoothQuant: (acc * sx) * sw
        v = (acc.to(tl.float32) * rf[:, None]) * cs[None, :]
    if HAS_BIAS:
        v = v + tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    o_ptrs = o_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, v.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def col_scale(layout: WQLayout) -> torch.Tensor:
    """Per-output-row fp32 factors as the reference computes them (LLM.int8: ``absmax / 127``) from the
    layer's one stored scale per row."""
    scales = layout.scales.reshape(layout.out_features, -1)[:, 0].float()
    if layout.act_quant == ACT_LLM_INT8:
        return scales / 127.0
    return scales * layout.scale_mul


def w8a8_gemm(
    codes: torch.Tensor,
    rf: torch.Tensor,
    layout: WQLayout,
    cs: torch.Tensor,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    options: EngineOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """``codes [M, K]`` (int8, or e4m3 for fp8) times the layout's codes of the same kind, scaled per token
    (``rf``) and per output row (``cs``: ``col_scale(layout)``), plus the bias, rounded once to
    ``out_dtype``."""
    m, k = codes.shape
    n = layout.out_features
    if out is None:
        out = torch.empty((m, n), device=codes.device, dtype=out_dtype)
    bm, bn, bk, group_m, warps, stages = options.w8a8_gemm_tiles
    w8 = weight_codes(layout)
    if codes.dtype != w8.dtype:
        raise ValueError(f"{codes.dtype} activation codes cannot multiply {w8.dtype} weight codes")
    stride_wn = 0 if layout.tile_n else w8.stride(0)
    _w8a8_gemm_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
        codes, w8, rf, cs, layout.bias if layout.bias is not None else out, out, m, n, k, codes.stride(0),
        stride_wn, out.stride(0), TN=layout.tile_n, TKB=4 * layout.tile_kv, FP8=layout.act_quant == ACT_FP8,
        PAIR_FIRST=layout.act_quant in (ACT_LLM_INT8, ACT_FP8), HAS_BIAS=layout.bias is not None, BM=bm, BN=bn,
        BK=bk, GROUP_M=group_m, FP8_MMA=options.w8a8_fp8_mma == "e4m3", num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def w8a8_product(
    x: torch.Tensor,
    layout: WQLayout,
    act_silu_mul: bool = False,
    out: torch.Tensor | None = None,
    options: EngineOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """The layer's product of ``x [M, K]`` (``[M, 2K]`` gate/up when ``act_silu_mul``) through 8-bit codes:
    the activations quantized (``fused.act_codes``, which refuses LLM.int8 with outlier decomposition),
    then ``w8a8_gemm``."""
    from quantbench.engine.kernels.fused import act_codes

    codes, rf = act_codes(x, layout, act_silu_mul, options)
    return w8a8_gemm(codes, rf, layout, col_scale(layout), out=out, out_dtype=x.dtype, options=options)
