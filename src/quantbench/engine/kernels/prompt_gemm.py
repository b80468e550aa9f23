"""Prompt-sized products (M >= ``routing.PROMPT_MIN_M``) in one Triton kernel: dequantize in registers,
multiply on tensor cores.

Why: the slab path (``dequant.dense_matmul``) writes every weight once as 16 bits into L2 and reads it
back for cuBLAS; at 128 prompt tokens that traffic, not the arithmetic, is most of an int4 first token.
Here each program decodes a ``[BN, BK]`` tile of codes (natural column order: the code slots of a word
are joined in registers, no shuffles) to the compute dtype exactly as ``dequantize()`` rounds it, and
multiplies it with the activations' ``[BM, BK]`` tile in one ``tl.dot`` (wgmma on Hopper). HBM sees the
packed codes once per ``BM`` tokens.

* Group-wise layouts (int4, NF4 / FP4, grouped int8): ``code * scale`` rounded to the compute dtype, as
  ``dequantize()`` and the slab path do.
* One scale per output row (int8, fp8, LLM.int8, SmoothQuant): the tile holds the exact code values and
  the fp32 product is scaled afterwards (with the W8A8 per-token factor ``row_factor``).
* Few tiles (a 4096-row layer is 32 tiles of 128 rows): K is split so every SM has work; partials are
  summed in a fixed order by the last program of a tile (``triton_common.store_out``): deterministic and
  CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantbench.engine.kernels.layouts import MODE_INT, MODE_TABLE, WQLayout
from quantbench.engine.kernels.triton_common import (
    codes_slot,
    group_scale,
    load_scale,
    load_words,
    num_sms,
    or_dummy,
    plan_split,
    row_stats,
    split_tile,
    store_out,
    table_decoder,
    table_prmt,
)
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions

__all__ = ["prompt_config", "prompt_gemm"]

_INT = tl.constexpr(MODE_INT)
_TABLE = tl.constexpr(MODE_TABLE)


@triton.jit
def _slot(words, vals, t_ptr, scale, sub, row_sub, i: tl.constexpr, MODE: tl.constexpr, BITS: tl.constexpr,
          HAS_ZERO: tl.constexpr, GROUP: tl.constexpr, ZERO_CONST: tl.constexpr, ASM: tl.constexpr,
          DT: tl.constexpr):  # fmt: skip
    """Weights of code slot ``i`` of every word, ``[BN, BKV]`` in the compute dtype ``DT``: ``code * scale``
    rounded once (group-wise) or the exact code value (per-row scale, applied after the product)."""
    if MODE == _TABLE and ASM != "":
        f = vals[i]
    else:
        f = codes_slot(words, t_ptr, sub, row_sub, i, MODE, BITS, HAS_ZERO, GROUP, ZERO_CONST)
    if MODE == _INT:  # codes_slot returns the value times 2**pos: undo it (exact, a power of two)
        POS: tl.constexpr = i * BITS - (i * BITS - (23 - BITS)) * (i * BITS > 23 - BITS)
        if GROUP == 0:
            if POS != 0:
                f = f * (1.0 / (1 << POS))
        else:
            f = f * (scale * (1.0 / (1 << POS)))
    elif GROUP > 0:
        f = f * scale
    return f.to(DT)


@triton.jit
def _pair(words, vals, t_ptr, scale, sub, row_sub, i: tl.constexpr, j: tl.constexpr, MODE: tl.constexpr,
          BITS: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP: tl.constexpr, ZERO_CONST: tl.constexpr,
          ASM: tl.constexpr, DT: tl.constexpr):  # fmt: skip
    """Slots ``i`` and ``j`` stacked on a new last axis (``[BN, BKV, 2]``)."""
    return tl.join(
        _slot(words, vals, t_ptr, scale, sub, row_sub, i, MODE, BITS, HAS_ZERO, GROUP, ZERO_CONST, ASM, DT),
        _slot(words, vals, t_ptr, scale, sub, row_sub, j, MODE, BITS, HAS_ZERO, GROUP, ZERO_CONST, ASM, DT),
    )


@triton.jit
def _decode_tile(words, t_ptr, scale, sub, row_sub, MODE: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                 GROUP: tl.constexpr, ZERO_CONST: tl.constexpr, ASM: tl.constexpr, P0: tl.constexpr,
                 P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr, P4: tl.constexpr, P5: tl.constexpr,
                 P6: tl.constexpr, P7: tl.constexpr, DT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """``[BN, BK]`` weights of a ``[BN, BK / VALS]`` tile of code words, columns in natural order.

    ``join`` stacks slots inside each thread's registers; the newest join is the fastest axis, so slots
    are paired (s, s + 4), then (s, s + 2), then (s, s + 1) to come out as ``word * VALS + slot``."""
    vals = 0
    if MODE == _TABLE and ASM != "":
        vals = table_prmt(words, ASM, P0, P1, P2, P3, P4, P5, P6, P7)
    if BITS == 4:
        w = tl.join(
            tl.join(
                _pair(words, vals, t_ptr, scale, sub, row_sub, 0, 4, MODE, BITS, HAS_ZERO, GROUP, ZERO_CONST, ASM, DT),
                _pair(words, vals, t_ptr, scale, sub, row_sub, 2, 6, MODE, BITS, HAS_ZERO, GROUP, ZERO_CONST, ASM, DT),
            ),
            tl.join(
                _pair(words, vals, t_ptr, scale, sub, row_sub, 1, 5, MODE, BITS, HAS_ZERO, GROUP, ZERO_CONST, ASM, DT),
                _pair(words, vals, t_ptr, scale, sub, row_sub, 3, 7, MODE, BITS, HAS_ZERO, GROUP, ZERO_CONST, ASM, DT),
            ),
        )  # fmt: skip
    else:
        w = tl.join(
            _pair(words, vals, t_ptr, scale, sub, row_sub, 0, 2, MODE, BITS, HAS_ZERO, GROUP, ZERO_CONST, ASM, DT),
            _pair(words, vals, t_ptr, scale, sub, row_sub, 1, 3, MODE, BITS, HAS_ZERO, GROUP, ZERO_CONST, ASM, DT),
        )  # fmt: skip
    return tl.reshape(w, (BN, BK))


@triton.jit(do_not_specialize=["M"])
def _prompt_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, t_ptr, dqc_ptr, dqn_ptr, dqo_ptr, b_ptr, rf_ptr, o_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_om, stride_wn, stride_sn, k_split, n_groups,
    TN: tl.constexpr, TKV: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr,
    HAS_ZERO: tl.constexpr, ZERO_CONST: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALE_MUL: tl.constexpr, SIGNED8: tl.constexpr, HAS_ROWF: tl.constexpr, SPLIT_K: tl.constexpr,
    TABLE_ASM: tl.constexpr, TP0: tl.constexpr, TP1: tl.constexpr, TP2: tl.constexpr, TP3: tl.constexpr,
    TP4: tl.constexpr, TP5: tl.constexpr, TP6: tl.constexpr, TP7: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PREFETCH: tl.constexpr,  # request the next step's codes by hand (else leave it to Triton's pipeliner)
):  # fmt: skip
    """``out[M, N] = x[M, K] @ dequant(W)[N, K].T (* row scale, * rf[m]) + bias``; program = (tile, split)."""
    VALS: tl.constexpr = 32 // BITS
    BKV: tl.constexpr = BK // VALS
    TILE_SCALE: tl.constexpr = GROUP > 0 and GROUP % BK == 0  # one scale per row for the whole step
    DT: tl.constexpr = x_ptr.dtype.element_ty

    tile, ks, pid_m, pid_n, k_lo, k_hi = split_tile(M, K, k_split, BM, SPLIT_K)

    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    offs_j = tl.arange(0, BKV)
    offs_k = tl.arange(0, BK)
    KW = K // VALS
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BM, BN), dtype=tl.float32)

    row_scale, row_sub = row_stats(s_ptr, z_ptr, rows, mask_n, stride_sn, GROUP, HAS_ZERO, SCALE_MUL)
    # the next step's codes (and raw scales) are requested before this step is decoded
    if PREFETCH:
        words_n = load_words(w_ptr, rows, mask_n, k_lo, k_hi, offs_j, stride_wn, KW, VALS, TN, TKV)
        if GROUP > 0:
            raw_n, sub_n = load_scale(s_ptr, z_ptr, rows, mask_n, k_lo, k_hi, offs_j, stride_sn, n_groups, GROUP,
                                       VALS, TILE_SCALE, MODE == _INT and HAS_ZERO, TN)  # fmt: skip
    for k0 in range(k_lo, k_hi, BK):
        if PREFETCH:
            words = words_n
            k_next = k0 + BK
            words_n = load_words(w_ptr, rows, mask_n, k_next, k_hi, offs_j, stride_wn, KW, VALS, TN, TKV)
        else:
            words = load_words(w_ptr, rows, mask_n, k0, k_hi, offs_j, stride_wn, KW, VALS, TN, TKV)
        if SIGNED8:
            words = words ^ -2139062144  # 0x80808080: int8 two's complement -> offset binary
        words = words.to(tl.uint32, bitcast=True)
        scale = 1.0
        sub = 0.0
        if GROUP > 0:
            if PREFETCH:
                raw = raw_n
                sub = sub_n
                raw_n, sub_n = load_scale(s_ptr, z_ptr, rows, mask_n, k_next, k_hi, offs_j, stride_sn, n_groups,
                                           GROUP, VALS, TILE_SCALE, MODE == _INT and HAS_ZERO, TN)  # fmt: skip
            else:
                raw, sub = load_scale(s_ptr, z_ptr, rows, mask_n, k0, k_hi, offs_j, stride_sn, n_groups, GROUP, VALS,
                                       TILE_SCALE, MODE == _INT and HAS_ZERO, TN)  # fmt: skip
            scale = group_scale(raw, rows, mask_n, k0, offs_j, stride_sn, dqc_ptr, dqn_ptr, dqo_ptr, GROUP, VALS,
                                TILE_SCALE, NESTED, SCALE_MUL)  # fmt: skip
        w = _decode_tile(words, t_ptr, scale, sub, row_sub, MODE, BITS, HAS_ZERO, GROUP, ZERO_CONST, TABLE_ASM,
                         TP0, TP1, TP2, TP3, TP4, TP5, TP6, TP7, DT, BN, BK)  # fmt: skip
        xt = tl.load(x_rows + (k0 + offs_k)[None, :], mask=mask_m[:, None], other=0.0)
        acc = tl.dot(xt, tl.trans(w), acc)  # the weights as the second operand: stored once to shared memory

    out = acc  # [BM, BN]; the bias is indexed per element (same-shape offsets)
    if GROUP == 0:
        out = out * row_scale[None, :]
    if HAS_ROWF:
        out = out * tl.load(rf_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    omask = mask_m[:, None] & mask_n[None, :]
    cols = offs_n[None, :] + offs_m[:, None] * 0
    o_off = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    ws_off = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    store_out(out, omask, o_off, ws_off, M * N, cols, omask, b_ptr, o_ptr, ws_ptr, cnt_ptr, tile, ks, HAS_BIAS,
               SPLIT_K)  # fmt: skip


def prompt_config(m: int, n: int, k: int, bits: int, mode: int, group: int, sms: int = 132) -> dict:
    """Tile sizes, warps, prefetching and split-K for one product, from the H200 sweep of the Mistral-7B
    shapes at 128 tokens (``benchmarks/prompt_gemm_sweep.py``, docs/bench.md):

    * one program per SM (shared memory and registers allow no second), so K is split into the most
      pieces that still fit one wave: a second, partly empty wave cost more than the split saved
      (o_proj int4: 8 splits 40.6 us, 4 splits 24.0);
    * (the kernel takes the weights as the dot's second operand, stored once to shared memory: faster
      for 8-bit and NF4; as the first operand int4 was up to 10 % faster, but with tile-major codes,
      split K and a partial last token tile it summed wrongly on the H200, cause not found, so that
      variant was removed);
    * layers with a wave of tiles and no split (gate/up): int4 steps of 64 columns (114 -> 89 us) and
      8-bit codes left to Triton's pipeliner (111 -> 91 us).
    """
    vals = 32 // bits
    int4 = bits == 4 and mode == MODE_INT
    bm = 128 if m > 64 else 64
    bn = 128
    bk = 128 if bits == 4 else 64
    if 0 < group < bk:
        bk = max(group, 32)  # one scale per row per step where the group allows it
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = 1
    while tiles * split * 2 <= sms and (k // bk) // (split * 2) >= 4 and split < 16:
        split *= 2
    prefetch = 1
    if split == 1:
        if int4:
            bk = 64
        elif bits == 8:
            prefetch = 0
    while bk > 16 and k % bk:
        bk //= 2
    if k % bk or bk < 2 * vals:
        return {}
    return {"BM": bm, "BN": bn, "BK": bk, "SPLIT_K": split, "num_warps": 8, "num_stages": 3,
            "PREFETCH": prefetch}  # fmt: skip


def prompt_gemm(
    x: torch.Tensor,
    layout: WQLayout,
    *,
    row_factor: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    options: EngineOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """``x [M, K] @ dequant(W).T (* row_factor[:, None]) + bias`` without a dequantized copy of W."""
    m = x.shape[0]
    n, k = layout.out_features, layout.in_features
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    sms = num_sms(x.device)
    cfg = dict(config or prompt_config(m, n, k, layout.bits, layout.mode, layout.group, sms))
    if not cfg:
        raise ValueError(f"no prompt kernel configuration for K={k}, bits={layout.bits}")
    cfg = {"PREFETCH": 1, **cfg}
    bm, bn, bk = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BK")
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split, k_split, ws, cnt = plan_split(cfg.pop("SPLIT_K", 1), tiles, m * n, k, bk, out)
    _prompt_gemm_kernel[(tiles * split,)](
        x, layout.w32, layout.scales,
        *or_dummy(layout, layout.zeros, layout.table, layout.dq_code, layout.dq_nested, layout.dq_offset,
                  layout.bias, row_factor),
        out, ws, cnt, m, n, k, x.stride(0), out.stride(0), layout.w32.stride(0), layout.scale_stride, k_split,
        layout.n_groups,
        TN=layout.tile_n, TKV=layout.tile_kv, GROUP=layout.group, BITS=layout.bits, MODE=layout.mode,
        HAS_ZERO=layout.zeros is not None, ZERO_CONST=float(layout.zero_const), NESTED=layout.dq_code is not None,
        HAS_BIAS=layout.bias is not None, SCALE_MUL=float(layout.scale_mul), SIGNED8=layout.signed8,
        HAS_ROWF=row_factor is not None, SPLIT_K=split, **table_decoder(layout, x.device, options), BM=bm, BN=bn, BK=bk, **cfg,
    )  # fmt: skip
    return out
