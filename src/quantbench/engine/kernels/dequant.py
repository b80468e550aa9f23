"""Long prompts (more than ``EngineOptions.prompt_gemm_max_m`` tokens, or all prompts with
``prompt_kernel="slabs"``): dequantize a slab of rows into an L2-sized 16-bit scratch buffer, multiply it
with cuBLAS, next slab. Shorter prompts (from ``routing.PROMPT_MIN_M`` tokens) take the fused ``prompt_gemm``
kernel, which decodes each weight tile once per 128 tokens; the slabs decode each weight once, so past a
few hundred tokens cuBLAS's speed wins.

Why slabs: dequantizing a whole layer first would write and re-read a 16-bit copy of it (4x the int4
bytes) through HBM; slabs of at most ``EngineOptions.slab_elems`` weights reuse one buffer that stays in
the 50 MB L2 between the dequantize kernel and the GEMM, so HBM sees little more than the packed codes.
That holds where launches are free, in a CUDA graph (the engine's prompt pass). A product launched
eagerly (evaluation batches) dequantizes the whole weight (up to ``EngineOptions.eager_slab_elems``) into
one buffer and multiplies once: a dozen kernel pairs per layer launched from Python would leave the GPU
idle between them, and at evaluation sizes (thousands of tokens) the product, not the extra HBM pass,
dominates.

The slab holds ``code * scale`` rounded to the compute dtype, as ``dequantize()`` does (per-output-row
scales of int8 / fp8 / LLM.int8 / SmoothQuant too, unless ``EngineOptions.slab_fold_scales`` is off: then
the exact code values, and the scales multiply the product afterwards); layouts with per-group offsets
(llama.cpp's q4_K ..., ``kernels/offsets.py``) get ``code * scale - offset``, llama.cpp's weight.
``benchmarks/dequant_bw.py`` times the dequantization of whole weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantbench.engine.kernels.layouts import MODE_INT, MODE_TABLE, WQLayout
from quantbench.engine.kernels.triton_common import group_off, or_dummy, word_off
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions

_SCRATCH: dict[tuple[str, torch.dtype, int], torch.Tensor] = {}


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, z_ptr, t_ptr, dqc_ptr, dqn_ptr, dqo_ptr, ov_ptr, os_ptr, o_ptr,
    r0, n_rows, stride_wn, stride_sn, stride_o, K, n_groups, stride_ov, stride_os,
    TN: tl.constexpr, TKV: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr, HAS_ZERO: tl.constexpr,
    ZERO_CONST: tl.constexpr, NESTED: tl.constexpr, SCALE_MUL: tl.constexpr, SIGNED8: tl.constexpr,
    APPLY_SCALE: tl.constexpr, OFFSET: tl.constexpr, OFFSET_SUB: tl.constexpr, BN: tl.constexpr,
    BKV: tl.constexpr,
):  # fmt: skip
    """Rows ``r0 .. r0 + n_rows`` of the dequantized weight into ``o`` (row ``r`` at ``o[r - r0]``).

    A tile of words ``[BN, BKV]`` is expanded to ``[BN, BKV, VALS]`` (slot = last axis, per-word
    scale / zero broadcast over it) and stored as the contiguous columns ``[BN, BKV * VALS]``."""
    VALS: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    local = tl.program_id(0) * BN + tl.arange(0, BN)
    mask_n = local < n_rows
    rows = (r0 + local).to(tl.int64)
    offs_j = tl.program_id(1) * BKV + tl.arange(0, BKV)
    woff = word_off(rows[:, None], offs_j[None, :], stride_wn, K // VALS, TN, TKV)
    words = tl.load(w_ptr + woff, mask=mask_n[:, None], other=0)
    if SIGNED8:
        words = words ^ -2139062144  # 0x80808080: two's complement -> offset binary (zero 128)
    words = words.to(tl.uint32, bitcast=True)
    slot = tl.arange(0, VALS)
    if MODE == 1:  # bitsandbytes table: slot 2b is the high nibble of byte b
        shift = (slot // 2) * 8 + (1 - slot % 2) * 4
    else:
        shift = slot * BITS
    codes = (words[:, :, None] >> shift.to(tl.uint32)[None, None, :]) & MASK  # [BN, BKV, VALS]
    if MODE == 1:
        f = tl.load(t_ptr + codes.to(tl.int32))
    elif MODE == 0:
        f = codes.to(tl.float32)
        if HAS_ZERO:
            if GROUP == 0:
                zidx = rows * stride_sn
                f = f - tl.load(z_ptr + zidx, mask=mask_n, other=0).to(tl.float32)[:, None, None]
            else:
                zidx = group_off(rows[:, None], ((offs_j * VALS) // GROUP)[None, :], stride_sn, n_groups, TN)
                f = f - tl.load(z_ptr + zidx, mask=mask_n[:, None], other=0).to(tl.float32)[:, :, None]
        else:
            f = f - ZERO_CONST
    else:  # e4m3
        f = codes.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    if APPLY_SCALE:
        if GROUP == 0:
            scale = tl.load(s_ptr + rows * stride_sn, mask=mask_n, other=0.0).to(tl.float32) * SCALE_MUL
            f = f * scale[:, None, None]
        else:
            g = ((offs_j * VALS) // GROUP)[None, :]
            raw = tl.load(
                s_ptr + group_off(rows[:, None], g, stride_sn, n_groups, TN), mask=mask_n[:, None], other=0
            )
            if NESTED:  # indexed by the logical (row-major) block number
                nest = tl.load(
                    dqn_ptr + (rows[:, None] * stride_sn + g) // 256, mask=mask_n[:, None], other=0.0
                )
                scale = tl.load(dqc_ptr + raw.to(tl.int32)) * nest + tl.load(dqo_ptr)
            else:
                scale = raw.to(tl.float32) * SCALE_MUL
            f = f * scale[:, :, None]
            if OFFSET > 0:  # minus the group's offset (ggml_layout.GroupOffsets: 1 float, 2 scale * uint8)
                oidx = rows[:, None] * stride_ov + g
                off = tl.load(ov_ptr + oidx, mask=mask_n[:, None], other=0).to(tl.float32)
                if OFFSET == 2:
                    sidx = rows[:, None] * stride_os + g // OFFSET_SUB
                    off = tl.load(os_ptr + sidx, mask=mask_n[:, None], other=0).to(tl.float32) * off
                f = f - off[:, :, None]
    vals = tl.reshape(f, (BN, BKV * VALS))
    cols = tl.program_id(1) * (BKV * VALS) + tl.arange(0, BKV * VALS)
    out_rows = o_ptr + local.to(tl.int64)[:, None] * stride_o
    tl.store(out_rows + cols[None, :], vals.to(o_ptr.dtype.element_ty), mask=mask_n[:, None])


def dequantize_rows(
    layout: WQLayout, r0: int, n_rows: int, out: torch.Tensor, apply_scale: bool = True
) -> None:
    """``out[:n_rows] = dequant(W)[r0 : r0 + n_rows]`` (codes minus zero only when not ``apply_scale``)."""
    k = layout.in_features
    vals = 32 // layout.bits
    bkv = 64 // vals * 4  # 256 columns per program (32 int4 words, 64 8-bit ones)
    while (k // vals) % bkv:
        bkv //= 2
    grid = (triton.cdiv(n_rows, 32), (k // vals) // bkv)
    off = layout.offsets  # ggml_layout.GroupOffsets (row-major) or None
    off_values = off.values if off is not None else None
    off_scale = off.scale if off is not None else None
    _dequant_kernel[grid](
        layout.w32, layout.scales,
        *or_dummy(layout, layout.zeros, layout.table, layout.dq_code, layout.dq_nested, layout.dq_offset, off_values,
                  off_scale),
        out, r0, n_rows, layout.w32.stride(0), layout.scale_stride, out.stride(0), k, layout.n_groups,
        0 if off is None else off_values.stride(0), 0 if off_scale is None else off_scale.stride(0),
        TN=layout.tile_n, TKV=layout.tile_kv, GROUP=layout.group, BITS=layout.bits, MODE=layout.mode, HAS_ZERO=layout.zeros is not None,
        ZERO_CONST=float(layout.zero_const), NESTED=layout.dq_code is not None,
        SCALE_MUL=float(layout.scale_mul), SIGNED8=layout.signed8, APPLY_SCALE=apply_scale,
        OFFSET=0 if off is None else (2 if off_scale is not None else 1), OFFSET_SUB=1 if off is None else off.sub,
        BN=32, BKV=bkv, num_warps=4,
        # offsets: code * scale and the subtraction rounded apart (no FMA), as llama.cpp computes the weight
        **({} if off is None else {"enable_fp_fusion": False}),
    )  # fmt: skip


def _scratch(device: torch.device, dtype: torch.dtype, buffers: int, elems: int, eager: bool) -> torch.Tensor:
    """``[buffers, >= elems]`` slab buffers. L2 slabs: one set per slab size, allocated by the first (eager)
    call, since a captured graph keeps pointing at the buffer it was captured with. Eager products: one
    buffer, grown to the largest weight seen (never captured)."""
    key = (str(device), dtype, -1 if eager else elems)
    have = _SCRATCH.get(key)
    if have is None or have.shape[0] < buffers or have.shape[1] < elems:
        _SCRATCH.pop(key, None)  # free the smaller buffer first
        _SCRATCH[key] = torch.empty((buffers, elems), device=device, dtype=dtype)
    return _SCRATCH[key]


_SIDE: dict[str, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    key = str(device)
    if key not in _SIDE:
        _SIDE[key] = torch.cuda.Stream(device)
    return _SIDE[key]


@triton.jit(do_not_specialize=["M"])
def _rescale_kernel(o_ptr, cs_ptr, rf_ptr, b_ptr, M, N, stride_o, col_mul,
                    HAS_CS: tl.constexpr, HAS_RF: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr):  # fmt: skip
    """In place: ``o = ((o * cs[n] * col_mul) * rf[m]) + bias[n]`` in fp32, rounded once to o's dtype."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = o_ptr + offs_m.to(tl.int64)[:, None] * stride_o + offs_n[None, :]
    v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_CS:
        v = v * (tl.load(cs_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32) * col_mul)[None, :]
    if HAS_RF:
        v = v * tl.load(rf_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    if HAS_BIAS:
        v = v + tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(ptrs, v.to(o_ptr.dtype.element_ty), mask=mask)


def dense_matmul(
    x: torch.Tensor,
    layout: WQLayout,
    row_factor: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    options: EngineOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """``x [M, K] @ dequant(W).T (* row_factor[:, None]) + bias`` through L2-resident slabs and cuBLAS.

    cuBLAS writes each slab's product (plus bias) straight into its columns of ``out`` (leading dimension
    N). An extra pass over ``out`` runs only for a ``row_factor`` (W8A8 activations quantized without
    ``act_quant(fold=True)``) or, with ``options.slab_fold_scales`` off, bf16 per-row scales.
    """
    n, k = layout.out_features, layout.in_features
    m = x.shape[0]
    # Scales are applied as the slab is dequantized (rounded as ``dequantize()`` rounds them), unless
    # ``slab_fold_scales`` is off: then bf16 per-row scales multiply the fp32 value of the rounded product
    # in one more pass (fp16 products of raw codes, e.g. 127 * 127 * K, overflow its range).
    post_scale = (
        not options.slab_fold_scales
        and layout.group == 0
        and layout.mode != MODE_TABLE
        and x.dtype == torch.bfloat16
    )
    mixed_bias = layout.bias is not None and layout.bias.dtype != x.dtype
    epilogue = post_scale or row_factor is not None or mixed_bias
    # without an epilogue pass cuBLAS adds the bias (fp32, rounded once with the product)
    bias = None if epilogue else layout.bias
    eager = bool(options.eager_slab_elems) and not (x.is_cuda and torch.cuda.is_current_stream_capturing())
    budget = max(options.slab_elems, options.eager_slab_elems) if eager else options.slab_elems
    slab = max(64, (budget // k) // 64 * 64)
    if out is None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    starts = list(range(0, n, slab))
    # With two buffers the next slab is dequantized on a side stream while cuBLAS multiplies this one:
    # both kernels leave most of the GPU idle at prompt sizes (a slab's product is only a few tiles wide).
    overlap = options.slab_overlap and x.is_cuda and len(starts) > 1 and not eager
    # L2 slabs share one buffer set per budget (a slab is at least 64 rows, which can exceed the budget)
    elems = min(slab, n) * k if eager else max(budget, slab * k)
    scratch = _scratch(x.device, x.dtype, 2 if overlap else 1, elems, eager)
    main = torch.cuda.current_stream(x.device) if overlap else None
    side = _side_stream(x.device) if overlap else None
    if overlap:
        side.wait_stream(main)  # the buffers' previous readers (an earlier product) were queued on main
    freed: list = [None, None]  # per buffer: the product that last read it
    for i, r0 in enumerate(starts):
        rows = min(slab, n - r0)
        w = scratch[i % 2 if overlap else 0, : rows * k].view(rows, k)
        if overlap:
            with torch.cuda.stream(side):
                if freed[i % 2] is not None:
                    side.wait_event(freed[i % 2])
                dequantize_rows(layout, r0, rows, w, apply_scale=not post_scale)
                ready = side.record_event()
            main.wait_event(ready)
        else:
            dequantize_rows(layout, r0, rows, w, apply_scale=not post_scale)
        if bias is None:
            torch.mm(x, w.t(), out=out[:, r0 : r0 + rows])
        else:
            torch.addmm(bias[r0 : r0 + rows], x, w.t(), out=out[:, r0 : r0 + rows])
        if overlap:
            freed[i % 2] = main.record_event()
    if epilogue:
        bm, bn = 16, 256
        scales = layout.scales.reshape(n, -1)[:, 0] if post_scale else out
        _rescale_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            out, scales, row_factor if row_factor is not None else out,
            layout.bias if layout.bias is not None else out,
            m, n, out.stride(0), float(layout.scale_mul),
            HAS_CS=post_scale, HAS_RF=row_factor is not None, HAS_BIAS=layout.bias is not None, BM=bm, BN=bn,
            num_warps=4,
        )  # fmt: skip
    return out


__all__ = ["MODE_INT", "dense_matmul", "dequantize_rows"]
