"""Triton matmul for weight-quantized linears: ``out = x @ dequant(W).T + bias`` without materializing W.

The kernel reads the packed weights *in place* (no repacking, no extra memory): the uint8 storage
``[N, K * bits / 8]`` of a layer is viewed as int32 words ``[N, K * bits / 32]`` (a free
``Tensor.view``); one word holds 8 int4 or 4 int8 codes of consecutive input columns. A tile of words
``[BN, BK / VALS]`` is expanded in registers to codes ``[BN, BK / VALS, VALS]`` (natural column order),
so the activations of the tile are one contiguous, vectorized load ``x[k0 : k0 + BK]``.

Layouts (``WQLayout``, from ``layouts.py``):

* ``MODE_INT``: RTN int4/int8 (also GPTQ without act-order, AWQ), ``w = (u - zero) * scale``; codes
  become fp32 by the exponent trick ``bits(u | 0x4B000000) - (2**23 + zero)`` (no int->float convert).
* ``MODE_TABLE``: bitsandbytes NF4/FP4, ``w = code[u] * absmax[block]``; each code is a gather from
  the 16-entry fp32 table (one 64-byte line, L1-resident), double-quantized absmax decoded in the
  kernel (``dynamic_map[c] * nested[block // 256] + offset``).
* ``MODE_FP8``: e4m3 codes (fp8 W8A8 and weight-only), per-row scale.

Paths (``pick_config``):

* ``USE_DOT=False`` (M = 1): fp32 FMAs on CUDA cores, the scale applied once per word.
* ``USE_DOT=True``: the tile is dequantized to the activation dtype exactly as ``dequantize()``
  rounds it and multiplied on tensor cores as ``dot(W [BN, BK], x.T [BK, BM])``; BM = 16 for small
  batches, 64/128 for the prompt (a fused dequantize-GEMM, no dequantized copy of W).
* ``SPLIT_K > 1``: programs split K; each writes an fp32 partial to a workspace and the last one to
  finish a tile (an atomic counter, reset afterwards) sums the partials in a fixed order, adds the
  bias and writes the output: deterministic, and the kernel leaves nothing to clear (CUDA-graph safe).

``ACT_SILU_MUL`` makes the kernel read ``x = silu(g) * u`` from a ``[M, 2K]`` gate/up output on the
fly (the MLP down projection), rounding like HF's bf16 ``act_fn(gate) * up``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantbench.engine.kernels.layouts import MODE_FP8, MODE_INT, MODE_TABLE, WQLayout
from quantbench.engine.kernels.pdl import launch_args, wait_prior
from quantbench.engine.kernels.triton_common import (
    codes_slot,
    group_scale,
    load_scale,
    load_words,
    num_sms,
    or_dummy,
    plan_split,
    row_stats,
    silu_gate,
    split_for,
    split_tile,
    store_out,
    table_decoder,
    table_prmt,
)
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions

__all__ = ["MODE_FP8", "MODE_INT", "MODE_TABLE", "pick_config", "wq_matmul"]

_INT = tl.constexpr(MODE_INT)
_TABLE = tl.constexpr(MODE_TABLE)


@triton.jit
def _wq_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, t_ptr, dqc_ptr, dqn_ptr, dqo_ptr, b_ptr, rf_ptr, o_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_om, stride_wn, stride_sn, k_split, n_groups,
    TN: tl.constexpr,  # tile-major codes / scales (rows per tile; 0 = row-major)
    TKV: tl.constexpr,  # words per tile row
    GROUP: tl.constexpr,  # input columns per scale; 0 = one scale per output row
    BITS: tl.constexpr,  # 4 or 8
    HIGH_FIRST: tl.constexpr,  # int4: even column in the high nibble (bitsandbytes)
    MODE: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    ZERO_CONST: tl.constexpr,  # the fixed zero point when HAS_ZERO is False (MODE_INT)
    NESTED: tl.constexpr,  # absmax stored as uint8 codes + nested absmax per 256 blocks + offset
    HAS_BIAS: tl.constexpr,
    SCALE_MUL: tl.constexpr,  # constant factor on every stored scale (LLM.int8: 1/127)
    SIGNED8: tl.constexpr,  # int8 codes stored signed (two's complement): flip the sign bit, zero 128
    HAS_ROWF: tl.constexpr,  # multiply output row m by rf[m] (W8A8: the activation scale)
    ACT_SILU_MUL: tl.constexpr,
    USE_DOT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    TABLE_ASM: tl.constexpr,  # MODE_TABLE: PTX decoding whole words (table_asm); "" = L1 table lookups
    TP0: tl.constexpr,  # the table's byte planes for TABLE_ASM (uint32 values)
    TP1: tl.constexpr,
    TP2: tl.constexpr,
    TP3: tl.constexpr,
    TP4: tl.constexpr,
    TP5: tl.constexpr,
    TP6: tl.constexpr,
    TP7: tl.constexpr,
    X_PERM: tl.constexpr,  # x was permuted by _x_permute_kernel (slot-major inside each BK tile)
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent (kernels/pdl.py)
):  # fmt: skip
    VALS: tl.constexpr = 32 // BITS
    BKV: tl.constexpr = BK // VALS
    TILE_SCALE: tl.constexpr = GROUP > 0 and GROUP % BK == 0  # one scale per row for the whole tile
    # dot path: scale the tile's fp32 product instead of every weight (MODE_INT / FP8 codes are exact in
    # bf16; NF4/FP4 code values are rounded to bf16 first, then scaled in fp32)
    POST_SCALE: tl.constexpr = TILE_SCALE or GROUP == 0
    XS_ON_X: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16  # bf16 has fp32's exponent range

    wait_prior(PDL)
    tile, ks, pid_m, pid_n, k_lo, k_hi = split_tile(M, K, k_split, BM, SPLIT_K)

    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)
    offs_j = tl.arange(0, BKV)
    KW = K // VALS
    if USE_DOT:
        offs_m = pid_m * BM + tl.arange(0, BM)
        mask_m = offs_m < M
        x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        offs_m = pid_m + tl.arange(0, 1)
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
        acc2 = tl.zeros((BN, BKV), dtype=tl.float32)

    row_scale, row_sub = row_stats(s_ptr, z_ptr, rows, mask_n, stride_sn, GROUP, HAS_ZERO, SCALE_MUL)

    # Software pipelining by hand: the words (and raw scales) of step k0 + BK are requested before step
    # k0 is computed, so every program keeps one tile of HBM reads in flight while it does the ALU work.
    words_n = load_words(w_ptr, rows, mask_n, k_lo, k_hi, offs_j, stride_wn, KW, VALS, TN, TKV)
    if GROUP > 0:
        raw_n, sub_n = load_scale(s_ptr, z_ptr, rows, mask_n, k_lo, k_hi, offs_j, stride_sn, n_groups, GROUP, VALS,
                                   TILE_SCALE, MODE == _INT and HAS_ZERO, TN)  # fmt: skip
    for k0 in range(k_lo, k_hi, BK):
        words = words_n
        k_next = k0 + BK
        words_n = load_words(w_ptr, rows, mask_n, k_next, k_hi, offs_j, stride_wn, KW, VALS, TN, TKV)
        if SIGNED8:
            words = words ^ -2139062144  # 0x80808080: int8 two's complement -> offset binary
        words = words.to(tl.uint32, bitcast=True)  # logical shifts
        # ---- scale (and zero) per (row, word): [BN, 1] for a tile inside one group, else [BN, BKV] ----
        sub = 0.0
        if GROUP > 0:
            raw = raw_n
            sub = sub_n
            raw_n, sub_n = load_scale(s_ptr, z_ptr, rows, mask_n, k_next, k_hi, offs_j, stride_sn, n_groups, GROUP,
                                       VALS, TILE_SCALE, MODE == _INT and HAS_ZERO, TN)  # fmt: skip
            scale = group_scale(raw, rows, mask_n, k0, offs_j, stride_sn, dqc_ptr, dqn_ptr, dqo_ptr, GROUP, VALS,
                                TILE_SCALE, NESTED, SCALE_MUL)  # fmt: skip
        # ---- one code slot at a time: columns k0 + VALS * j + i of every word j ----
        if USE_DOT:
            part = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            inner = tl.zeros((BN, BKV), dtype=tl.float32)
        if MODE == _TABLE and TABLE_ASM != "":
            vals = table_prmt(words, TABLE_ASM, TP0, TP1, TP2, TP3, TP4, TP5, TP6, TP7)
        for i in tl.static_range(VALS):
            if MODE == _TABLE and TABLE_ASM != "":
                f = vals[i]
            else:
                f = codes_slot(words, t_ptr, sub, row_sub, i, MODE, BITS, HAS_ZERO, GROUP, ZERO_CONST)
            # undo the slot's 2**pos (MODE_INT) on the activations: pos = min(i * BITS, 23 - BITS)
            xs = (
                1.0 / (1 << (i * BITS - (i * BITS - (23 - BITS)) * (i * BITS > 23 - BITS)))
                if MODE == _INT
                else 1.0
            )
            if X_PERM:
                kcol = k0 + i * BKV + offs_j  # activations pre-permuted slot-major: contiguous
            else:
                kcol = k0 + offs_j * VALS + i
            if USE_DOT:
                xp = x_cols + kcol[:, None]
                if ACT_SILU_MUL:
                    xi = silu_gate(
                        tl.load(xp, mask=mask_m[None, :], other=0.0),
                        tl.load(xp + K, mask=mask_m[None, :], other=0.0),
                    )
                else:
                    xi = tl.load(xp, mask=mask_m[None, :], other=0.0)
                if XS_ON_X:
                    if xs != 1.0:
                        xi = (xi.to(tl.float32) * xs).to(xi.dtype)  # exact: a power of two
                    wx = f
                else:
                    wx = f * xs  # fp16 cannot hold u * 2**19: undo the shift on the weights
                if POST_SCALE:
                    part = tl.dot(wx.to(xi.dtype), xi, part)  # small integers: exact
                else:
                    acc = tl.dot((wx * scale).to(xi.dtype), xi, acc)
            else:
                xp = x_row + kcol
                if ACT_SILU_MUL:
                    xi = silu_gate(tl.load(xp), tl.load(xp + K))
                else:
                    xi = tl.load(xp)
                if xs == 1.0:
                    inner += f * xi.to(tl.float32)[None, :]
                else:
                    inner += f * (xi.to(tl.float32) * xs)[None, :]
        if USE_DOT:
            if POST_SCALE:
                if GROUP == 0:
                    acc += part
                else:
                    acc += part * scale
        else:
            if GROUP == 0:
                acc2 += inner
            else:
                acc2 += inner * scale

    # ---- epilogue: per-row / per-token factors (linear, so before the split-K sum), bias, store ----
    if USE_DOT:
        out = acc
        if GROUP == 0:
            out = out * row_scale[:, None]
        if HAS_ROWF:
            out = out * tl.load(rf_ptr + offs_m, mask=mask_m, other=0.0)[None, :]
        omask = mask_n[:, None] & mask_m[None, :]
        o_off = offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
        ws_off = offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
    else:
        out = tl.sum(acc2, axis=1)
        if GROUP == 0:
            out = out * row_scale
        if HAS_ROWF:
            out = out * tl.load(rf_ptr + pid_m)
        omask = mask_n
        o_off = pid_m.to(tl.int64) * stride_om + offs_n
        ws_off = pid_m.to(tl.int64) * N + offs_n
    store_out(out, omask, o_off, ws_off, M * N, offs_n, mask_n, b_ptr, o_ptr, ws_ptr, cnt_ptr, tile, ks, HAS_BIAS,
               SPLIT_K)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def pick_config(M: int, N: int, K: int, bits: int, group: int, device: torch.device | None = None) -> dict:
    """Block sizes and split-K for one call (H100 measurements: benchmarks/kernel_bw.py, docs/bench.md)."""
    vals = 32 // bits
    if M == 1:
        bn, bk = (128, 128) if bits == 4 else (64, 128)
        cfg = {"USE_DOT": False, "BM": 1, "BN": bn, "BK": bk, "num_warps": 4, "num_stages": 3}
    elif M <= 16:
        cfg = {"USE_DOT": True, "BM": 16, "BN": 64, "BK": 16 * vals, "num_warps": 4, "num_stages": 3}
    else:
        cfg = {"USE_DOT": True, "BM": 64, "BN": 64, "BK": 16 * vals, "num_warps": 4, "num_stages": 4}
    cfg = fit_bk(cfg, K, bits, group)
    if cfg and M <= 16:
        cfg["SPLIT_K"] = split_for(M, N, K, cfg, num_sms(device) if device is not None else 132)
    return cfg


def fit_bk(cfg: dict, K: int, bits: int, group: int) -> dict:
    """Shrink BK until it divides K (dot tiles keep >= 16 columns per code slot); {} if impossible."""
    vals = 32 // bits
    min_bk = 16 * vals if cfg["USE_DOT"] else 2 * vals
    bk = cfg["BK"]
    while bk >= min_bk and K % bk:
        bk //= 2
    if bk < min_bk or K % bk:
        return {}
    return {**cfg, "BK": bk}


@triton.jit
def _x_permute_kernel(x_ptr, o_ptr, K, stride_x, stride_o, VALS: tl.constexpr, BK: tl.constexpr,
                      ACT_SILU_MUL: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """o[m, k0 + i * BKV + j] = x[m, k0 + VALS * j + i] (x = silu(g) * u of a gate/up output if ACT)."""
    wait_prior(PDL)
    BKV: tl.constexpr = BK // VALS
    row = tl.program_id(0).to(tl.int64)
    k0 = tl.program_id(1) * BK
    offs = tl.arange(0, BK)
    src = x_ptr + row * stride_x + k0 + (offs % BKV) * VALS + offs // BKV
    if ACT_SILU_MUL:
        v = silu_gate(tl.load(src), tl.load(src + K))
    else:
        v = tl.load(src)
    tl.store(o_ptr + row * stride_o + k0 + offs, v)


def permute_activations(
    x: torch.Tensor, k: int, bits: int, bk: int, act_silu_mul: bool, options: EngineOptions = DEFAULT_OPTIONS
) -> torch.Tensor:
    """``x [M, K]`` (or gate/up ``[M, 2K]`` with ``act_silu_mul``) reordered slot-major per BK tile."""
    out = torch.empty((x.shape[0], k), device=x.device, dtype=x.dtype)
    _x_permute_kernel[(x.shape[0], k // bk)](
        x, out, k, x.stride(0), out.stride(0), VALS=32 // bits, BK=bk, ACT_SILU_MUL=act_silu_mul, num_warps=4,
        **launch_args(x.device, options.pdl),
    )  # fmt: skip
    return out


def wq_matmul(
    x: torch.Tensor,
    layout: WQLayout,
    *,
    act_silu_mul: bool = False,
    row_factor: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    options: EngineOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """``x [M, K] @ dequant(W).T (* row_factor[:, None]) + bias`` (``x [M, 2K]`` gate/up when ``act_silu_mul``).

    ``out`` is ``[M, N]`` in x's dtype. Layers with activation quantization (``layout.act_quant``) are
    handled by :func:`quantbench.engine.kernels.linear`, which quantizes x first and passes the scales
    as ``row_factor`` (and which picks this kernel or another: ``routing.py``).
    """
    M = x.shape[0]
    N, K = layout.out_features, layout.in_features
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    cfg = dict(config or pick_config(M, N, K, layout.bits, layout.group, x.device))
    if not cfg:
        raise ValueError(f"no kernel configuration for K={K}, bits={layout.bits}")
    bm, bn = cfg.pop("BM"), cfg.pop("BN")
    split = cfg.pop("SPLIT_K", 1)
    x_perm = bool(cfg.pop("X_PERM", M > 16))
    asm_args = None
    if "TABLE_ASM" in cfg:
        asm_args = {key: cfg.pop(key) for key in ("TABLE_ASM", *(f"TP{i}" for i in range(8)))}
    if x_perm:  # prompt-sized x: one cheap pass makes every activation load contiguous
        x = permute_activations(x, K, layout.bits, cfg["BK"], act_silu_mul, options)
        act_silu_mul = False
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split, k_split, ws, cnt = plan_split(split, tiles, M * N, K, cfg["BK"], out)
    _wq_matmul_kernel[(tiles * split,)](
        x,
        layout.w32,
        layout.scales,
        *or_dummy(
            layout,
            layout.zeros,
            layout.table,
            layout.dq_code,
            layout.dq_nested,
            layout.dq_offset,
            layout.bias,
            row_factor,
        ),  # fmt: skip
        out,
        ws,
        cnt,
        M,
        N,
        K,
        x.stride(0),
        out.stride(0),
        layout.w32.stride(0),
        layout.scale_stride,
        k_split,
        layout.n_groups,
        TN=layout.tile_n,
        TKV=layout.tile_kv,
        GROUP=layout.group,
        BITS=layout.bits,
        HIGH_FIRST=layout.high_first,
        MODE=layout.mode,
        HAS_ZERO=layout.zeros is not None,
        ZERO_CONST=float(layout.zero_const),
        NESTED=layout.dq_code is not None,
        HAS_BIAS=layout.bias is not None,
        SCALE_MUL=float(layout.scale_mul),
        SIGNED8=layout.signed8,
        HAS_ROWF=row_factor is not None,
        ACT_SILU_MUL=act_silu_mul,
        SPLIT_K=split,
        **(asm_args if asm_args is not None else table_decoder(layout, x.device, options)),
        X_PERM=x_perm,
        BM=bm,
        BN=bn,
        **cfg,
        # No programmatic dependent launch here: on the H200 it made batch 8 slower (int4 5.35 -> 5.84 ms
        # per token, benchmarks/engine_ab.py), while the batch-1 GEMV and the small kernels gain from it.
        PDL=False,
    )
    return out
