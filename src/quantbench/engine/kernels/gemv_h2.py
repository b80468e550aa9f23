"""Batch-1 GEMV for weight-quantized linears in packed half2 arithmetic (CUDA only).

Why: at M = 1 the fp32 path of ``wq_matmul`` spends ~5.5 instructions per int4 weight (decode, magic
subtraction, FMA, layout shuffles) and stays near 40% of HBM bandwidth on an H100. Here every 32-bit
word of codes goes through one PTX block: magic-number ``lop3`` (int4 / int8), byte permutes (NF4 / FP4
tables) or ``cvt.f16x2.e4m3x2`` (fp8) give the codes as fp16 pairs, ``fma.f16x2`` multiplies them with
the matching activation pairs, and only the word's partial sum is widened to fp32: about two
instructions per int4 weight, so the loads, not the ALUs, set the pace.

Numerics. ``code - zero`` is exact in fp16 (small integers; e4m3 values; NF4/FP4 table values rounded
to fp16, as the PTX table decoder of ``wq_matmul`` already does). Each program scales its activations
by a power of two chosen from ``max |x|`` over its own K-slice so that they lie within [-32, 32]: exact
(bar fp16 subnormals far below the slice's maximum), and every half2 lane then sums at most four
products of at most 32 * 448 in magnitude, inside fp16 range. Products and the per-word sum round to
fp16 (relative 2**-11); the scale, the group sums and the split-K reduction are fp32.

Each activation pair feeds one ``fma.f16x2`` whose halves are two code slots of the same word; the
slot pairs follow how each format packs its codes (``_PAIRS``).
"""

from __future__ import annotations

import re

import torch
import triton
import triton.language as tl

from quantbench.engine.kernels.layouts import MODE_FP8, MODE_INT, MODE_TABLE, WQLayout
from quantbench.engine.kernels.pdl import launch_args, wait_prior
from quantbench.engine.kernels.triton_common import (
    group_scale,
    num_sms,
    or_dummy,
    plan_split,
    silu_gate,
    split_for,
    store_out,
    table_asm,
)
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions

__all__ = ["gemv_h2"]

# (low lane slot, high lane slot) of each activation pair, per (mode, bits): the slots one
# fma.f16x2 multiplies, in the order the PTX below produces them.
_PAIRS = {
    (MODE_INT, 4): ((0, 4), (1, 5), (2, 6), (3, 7)),  # nibbles i and i + 4 via masks 0x000F000F / 0x00F000F0
    (MODE_INT, 8): ((0, 2), (1, 3)),  # bytes 0/2, then 1/3 after a shift by 8
    (MODE_TABLE, 4): ((1, 0), (3, 2), (5, 4), (7, 6)),  # bitsandbytes: slot 2b is byte b's high nibble
    (MODE_FP8, 8): ((0, 1), (2, 3)),  # cvt.e4m3x2 of the low / high 16 bits
}

_TAIL = """
mov.b32 {l16, h16}, acc;
cvt.f32.f16 flo, l16;
cvt.f32.f16 fhi, h16;
add.f32 $0, flo, fhi;
"""

# $0 out (f32); $1 word; $2..$5 activation pairs; $6 = -(1024 + zero) and $7 = -(64 + zero) as half2.
_ASM_INT4 = (
    """{
.reg .b32 w8, t0, t1, t2, t3, acc, m0, m1, mg, k16;
.reg .b16 l16, h16;
.reg .f32 flo, fhi;
mov.b32 m0, 0x000F000F;
mov.b32 m1, 0x00F000F0;
mov.b32 mg, 0x64006400;
mov.b32 k16, 0x2C002C00;
shr.u32 w8, $1, 8;
lop3.b32 t0, $1, m0, mg, 0xEA;
lop3.b32 t1, $1, m1, mg, 0xEA;
lop3.b32 t2, w8, m0, mg, 0xEA;
lop3.b32 t3, w8, m1, mg, 0xEA;
add.rn.f16x2 t0, t0, $6;
fma.rn.f16x2 t1, t1, k16, $7;
add.rn.f16x2 t2, t2, $6;
fma.rn.f16x2 t3, t3, k16, $7;
mul.rn.f16x2 acc, t0, $2;
fma.rn.f16x2 acc, t1, $3, acc;
fma.rn.f16x2 acc, t2, $4, acc;
fma.rn.f16x2 acc, t3, $5, acc;
"""
    + _TAIL
    + "}"
)
# lop3 (a & 0x00FF00FF) | 0x64006400 = 1024 + byte; for two's-complement codes the same instruction
# also flips the sign bit: ((a & m) ^ 0x64806480) (offset binary, zero 128).
_ASM_INT8 = (
    """{
.reg .b32 w8, t0, t1, acc, m0, mg;
.reg .b16 l16, h16;
.reg .f32 flo, fhi;
mov.b32 m0, 0x00FF00FF;
mov.b32 mg, MAGIC;
shr.u32 w8, $1, 8;
lop3.b32 t0, $1, m0, mg, LUT;
lop3.b32 t1, w8, m0, mg, LUT;
add.rn.f16x2 t0, t0, $4;
add.rn.f16x2 t1, t1, $4;
mul.rn.f16x2 acc, t0, $2;
fma.rn.f16x2 acc, t1, $3, acc;
"""
    + _TAIL
    + "}"
)
_ASM_FP8 = (
    """{
.reg .b32 t0, t1, acc;
.reg .b16 w0, w1, l16, h16;
.reg .f32 flo, fhi;
mov.b32 {w0, w1}, $1;
cvt.rn.f16x2.e4m3x2 t0, w0;
cvt.rn.f16x2.e4m3x2 t1, w1;
mul.rn.f16x2 acc, t0, $2;
fma.rn.f16x2 acc, t1, $3, acc;
"""
    + _TAIL
    + "}"
)


def _table_h2_asm(table: torch.Tensor) -> tuple[str, list[int]]:
    """NF4/FP4: the byte-permute decoder of ``triton_common.table_asm`` (fp16 pairs p0..p3, high lane = even
    slot) followed by the half2 dot; table planes are $6..$13."""
    args = table_asm(table)
    body = args["TABLE_ASM"]
    decode = body[body.index("mov.b32 w, $8;") : body.index("mov.b32 {h1, h0}, p0;")]
    # operands: the word $8 -> $1, table planes $9..$16 -> $6..$13
    decode = re.sub(r"\$(\d+)", lambda m: "$" + str(1 if m.group(1) == "8" else int(m.group(1)) - 3), decode)
    asm = (
        "{\n.reg .b32 w, sa, sb, ya, yb, t, m, ma, mb, a0, a1, lo, hi, p0, p1, p2, p3, c, acc;\n"
        ".reg .b16 l16, h16;\n.reg .f32 flo, fhi;\n"
        + decode
        + "mul.rn.f16x2 acc, p0, $2;\nfma.rn.f16x2 acc, p1, $3, acc;\n"
        + "fma.rn.f16x2 acc, p2, $4, acc;\nfma.rn.f16x2 acc, p3, $5, acc;\n"
        + _TAIL
        + "}"
    )
    return asm, [args[f"TP{i}"] for i in range(8)]


def _half_bits(value: float) -> int:
    """int32 holding fp16(value) in both halves (as a signed Python int)."""
    h = int(torch.tensor(value, dtype=torch.float16).view(torch.int16).item()) & 0xFFFF
    word = h | (h << 16)
    return word - (1 << 32) if word >= 1 << 31 else word


@triton.jit
def _pack_h2(lo, hi):
    """fp32 pair -> one int32 holding (fp16(lo), fp16(hi)) as the low / high half."""
    return tl.inline_asm_elementwise(
        asm="cvt.rn.f16x2.f32 $0, $2, $1;",
        constraints="=r,f,f",
        args=[lo, hi],
        dtype=tl.int32,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _x_cols(x_ptr, cols, inv, K, ACT_SILU_MUL: tl.constexpr):
    """Activations at ``cols`` (silu(gate) * up when ACT_SILU_MUL), fp32, times the power of two ``inv``."""
    if ACT_SILU_MUL:
        v = silu_gate(tl.load(x_ptr + cols), tl.load(x_ptr + K + cols))
    else:
        v = tl.load(x_ptr + cols)
    return v.to(tl.float32) * inv


@triton.jit
def _x_pair(x_ptr, base, LO: tl.constexpr, HI: tl.constexpr, inv, K, ACT_SILU_MUL: tl.constexpr, BN: tl.constexpr,
            BKV: tl.constexpr):  # fmt: skip
    """The activations of code slots LO and HI of every word (columns ``base + LO`` / ``base + HI``) as
    one half2 per word, broadcast over the tile's rows: the operand of one ``fma.f16x2``."""
    pair = _pack_h2(
        _x_cols(x_ptr, base + LO, inv, K, ACT_SILU_MUL), _x_cols(x_ptr, base + HI, inv, K, ACT_SILU_MUL)
    )
    return tl.broadcast_to(pair[None, :], (BN, BKV))


@triton.jit
def _zero_h2(z, BIAS: tl.constexpr):
    """-(BIAS + z) as fp16 in both halves of an int32."""
    h = (-(z + BIAS)).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@triton.jit
def _load_words(w_ptr, tile, rows, offs_r, offs_j, mask_n, k0, k_hi, K, stride_wn, TILED: tl.constexpr,
                VALS: tl.constexpr, BN: tl.constexpr, BKV: tl.constexpr):  # fmt: skip
    """The code words of step ``k0``: [BN, BKV]. TILED storage is tile-major (``QuantLinear.store_tiled``)
    in exactly these steps, so the step's words are one contiguous block. Written out here rather than
    through ``wq_matmul.word_off`` (any tile size): with that general form the compiler no longer sees the
    contiguous run and emits 8-byte instead of 16-byte loads (sm_90 PTX)."""
    live = (k0 + offs_j * 0) < k_hi
    if TILED:
        steps = K // (BKV * VALS)
        block = (tile * steps + k0 // (BKV * VALS)).to(tl.int64) * (BN * BKV)
        ptrs = w_ptr + block + offs_r[:, None] * BKV + offs_j[None, :]
    else:
        ptrs = w_ptr + rows[:, None] * stride_wn + (k0 // VALS + offs_j)[None, :]
    return tl.load(ptrs, mask=mask_n[:, None] & live[None, :], other=0)


@triton.jit
def _load_group(s_ptr, tile, rows, offs_r, offs_j, mask_n, k0, k_hi, stride_sn, n_groups, GROUP: tl.constexpr,
                VALS: tl.constexpr, BN: tl.constexpr, TILE_SCALE: tl.constexpr, TILED: tl.constexpr):  # fmt: skip
    """Stored per-(row, group) values (scales or zeros) of step ``k0``: [BN, 1] when the step lies in one
    group, else [BN, BKV]. TILED storage holds each row tile's groups as ``[groups, BN]``; the tile is the
    program's own row block, so the index is the contiguous special case of ``wq_matmul.group_off``."""
    if TILE_SCALE:
        g = k0 // GROUP
        if TILED:
            idx = ((tile * n_groups + g).to(tl.int64) * BN + offs_r)[:, None]
        else:
            idx = (rows * stride_sn + g)[:, None]
        mask = (mask_n & ((k0 + rows * 0) < k_hi))[:, None]
    else:
        g = (k0 + offs_j * VALS) // GROUP
        if TILED:
            idx = (tile * n_groups + g[None, :]).to(tl.int64) * BN + offs_r[:, None]
        else:
            idx = rows[:, None] * stride_sn + g[None, :]
        mask = mask_n[:, None] & ((k0 + offs_j * 0) < k_hi)[None, :]
    return tl.load(s_ptr + idx, mask=mask, other=0)


@triton.jit
def _gemv_h2_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, dqc_ptr, dqn_ptr, dqo_ptr, b_ptr, rf_ptr, o_ptr, ws_ptr, cnt_ptr,
    N, K, stride_wn, stride_sn, k_split, n_groups,
    TILED: tl.constexpr,
    ASM: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr,
    HAS_ZERO: tl.constexpr, ZLO: tl.constexpr, ZHI: tl.constexpr, NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr, SCALE_MUL: tl.constexpr, HAS_ROWF: tl.constexpr, ACT_SILU_MUL: tl.constexpr,
    SPLIT_K: tl.constexpr,
    S0L: tl.constexpr, S0H: tl.constexpr, S1L: tl.constexpr, S1H: tl.constexpr,
    S2L: tl.constexpr, S2H: tl.constexpr, S3L: tl.constexpr, S3H: tl.constexpr,
    TP0: tl.constexpr, TP1: tl.constexpr, TP2: tl.constexpr, TP3: tl.constexpr,
    TP4: tl.constexpr, TP5: tl.constexpr, TP6: tl.constexpr, TP7: tl.constexpr,
    BN: tl.constexpr, BKV: tl.constexpr, XB: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    VALS: tl.constexpr = 32 // BITS
    BK: tl.constexpr = BKV * VALS
    TILE_SCALE: tl.constexpr = GROUP > 0 and GROUP % BK == 0
    FOUR: tl.constexpr = VALS == 8  # four activation pairs per word (4-bit codes), else two

    pid = tl.program_id(0)
    tile = pid // SPLIT_K
    ks = pid % SPLIT_K
    k_lo = ks * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    offs_r = tl.arange(0, BN)
    offs_n = tile * BN + offs_r
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)
    offs_j = tl.arange(0, BKV)

    # STAGES == 1: software pipelining by hand (the next tile is requested before this one is used; the
    # first before the activation scan). STAGES > 1: Triton's loop pipeliner (async copies) instead.
    if STAGES == 1:
        words_n = _load_words(w_ptr, tile, rows, offs_r, offs_j, mask_n, k_lo, k_hi, K, stride_wn, TILED, VALS, BN,
                              BKV)  # fmt: skip
        if GROUP > 0:
            raw_n = _load_group(s_ptr, tile, rows, offs_r, offs_j, mask_n, k_lo, k_hi, stride_sn, n_groups, GROUP,
                                VALS, BN, TILE_SCALE, TILED)  # fmt: skip
    wait_prior(PDL)  # the first weight tile is on its way; x and the outputs belong to earlier kernels

    # max |x| over this program's K-slice -> 2**(131 - E) puts it in [16, 32) (E: its fp32 exponent)
    amax = 0.0
    for c0 in range(k_lo, k_hi, XB):
        cols = c0 + tl.arange(0, XB)
        cm = cols < k_hi
        if ACT_SILU_MUL:
            xv = silu_gate(
                tl.load(x_ptr + cols, mask=cm, other=0.0), tl.load(x_ptr + K + cols, mask=cm, other=0.0)
            )
        else:
            xv = tl.load(x_ptr + cols, mask=cm, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(xv.to(tl.float32)), axis=0))
    e_bits = tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 100)
    inv = ((258 - e_bits) << 23).to(tl.float32, bitcast=True)
    unscale = ((e_bits - 4) << 23).to(tl.float32, bitcast=True)

    row_scale = 1.0
    if GROUP == 0:
        row_scale = tl.load(s_ptr + rows * stride_sn, mask=mask_n, other=0.0).to(tl.float32) * SCALE_MUL
        if HAS_ZERO:
            zr = tl.load(z_ptr + rows * stride_sn, mask=mask_n, other=0).to(tl.float32)[:, None]
            zlo = tl.broadcast_to(_zero_h2(zr, 1024.0), (BN, BKV))
            zhi = tl.broadcast_to(_zero_h2(zr, 64.0), (BN, BKV))
    if not HAS_ZERO:
        zlo = tl.full((BN, BKV), ZLO, tl.int32)
        zhi = tl.full((BN, BKV), ZHI, tl.int32)

    acc = tl.zeros((BN, BKV), dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BK, num_stages=STAGES):
        if STAGES == 1:
            words = words_n
            k_next = k0 + BK
            words_n = _load_words(w_ptr, tile, rows, offs_r, offs_j, mask_n, k_next, k_hi, K, stride_wn, TILED,
                                  VALS, BN, BKV)  # fmt: skip
        else:
            words = _load_words(w_ptr, tile, rows, offs_r, offs_j, mask_n, k0, k_hi, K, stride_wn, TILED, VALS, BN,
                                BKV)  # fmt: skip
        if GROUP > 0:
            if STAGES == 1:
                raw = raw_n
                raw_n = _load_group(s_ptr, tile, rows, offs_r, offs_j, mask_n, k_next, k_hi, stride_sn, n_groups,
                                    GROUP, VALS, BN, TILE_SCALE, TILED)  # fmt: skip
            else:
                raw = _load_group(s_ptr, tile, rows, offs_r, offs_j, mask_n, k0, k_hi, stride_sn, n_groups, GROUP,
                                  VALS, BN, TILE_SCALE, TILED)  # fmt: skip
            scale = group_scale(raw, rows, mask_n, k0, offs_j, stride_sn, dqc_ptr, dqn_ptr, dqo_ptr, GROUP, VALS,
                                TILE_SCALE, NESTED, SCALE_MUL)  # fmt: skip
            if HAS_ZERO:
                zg = _load_group(z_ptr, tile, rows, offs_r, offs_j, mask_n, k0, k_hi, stride_sn, n_groups, GROUP, VALS,
                                 BN, TILE_SCALE, TILED).to(tl.float32)  # fmt: skip
                zlo = tl.broadcast_to(_zero_h2(zg, 1024.0), (BN, BKV))
                zhi = tl.broadcast_to(_zero_h2(zg, 64.0), (BN, BKV))
        base = k0 + offs_j * VALS
        x0 = _x_pair(x_ptr, base, S0L, S0H, inv, K, ACT_SILU_MUL, BN, BKV)
        x1 = _x_pair(x_ptr, base, S1L, S1H, inv, K, ACT_SILU_MUL, BN, BKV)
        w32 = words.to(tl.int32, bitcast=True)
        if FOUR:
            x2 = _x_pair(x_ptr, base, S2L, S2H, inv, K, ACT_SILU_MUL, BN, BKV)
            x3 = _x_pair(x_ptr, base, S3L, S3H, inv, K, ACT_SILU_MUL, BN, BKV)
            if MODE == 1:  # table (NF4 / FP4): the 8 byte planes of the fp16 table ride along as registers
                z = w32 * 0
                f = tl.inline_asm_elementwise(
                    asm=ASM,
                    constraints="=f,r,r,r,r,r,r,r,r,r,r,r,r,r",
                    args=[w32, x0, x1, x2, x3, z + TP0, z + TP1, z + TP2, z + TP3, z + TP4, z + TP5, z + TP6, z + TP7],
                    dtype=tl.float32,
                    is_pure=True,
                    pack=1,
                )  # fmt: skip
            else:
                f = tl.inline_asm_elementwise(
                    asm=ASM, constraints="=f,r,r,r,r,r,r,r", args=[w32, x0, x1, x2, x3, zlo, zhi],
                    dtype=tl.float32, is_pure=True, pack=1,
                )  # fmt: skip
        elif MODE == 2:  # fp8 e4m3
            f = tl.inline_asm_elementwise(
                asm=ASM, constraints="=f,r,r,r", args=[w32, x0, x1], dtype=tl.float32, is_pure=True, pack=1
            )  # fmt: skip
        else:
            f = tl.inline_asm_elementwise(
                asm=ASM, constraints="=f,r,r,r,r", args=[w32, x0, x1, zlo], dtype=tl.float32, is_pure=True, pack=1
            )  # fmt: skip
        if GROUP > 0:
            acc += f * scale
        else:
            acc += f
    out = tl.sum(acc, axis=1) * unscale
    if GROUP == 0:
        out = out * row_scale
    if HAS_ROWF:
        out = out * tl.load(rf_ptr)
    offs64 = offs_n.to(tl.int64)
    store_out(out, mask_n, offs64, offs64, N, offs_n, mask_n, b_ptr, o_ptr, ws_ptr, cnt_ptr, tile, ks, HAS_BIAS,
               SPLIT_K)  # fmt: skip


_TABLE_ASM: dict[tuple, tuple[str, list[int]]] = {}


def _config(n: int, k: int, layout: WQLayout, device: torch.device) -> dict:
    """Block sizes from the H100 sweeps (benchmarks/kernel_bw.py --sweep-h2 / --tiled, docs/bench.md).

    Tile-major codes: the layout's tile is the step; K-splits until about 4 (int4) or 8 (NF4 / FP4 /
    8-bit) programs per SM, each keeping at least two steps. Row-major codes: 16-word (int4) / 32-word
    (8-bit) / 8-word (NF4, FP4) steps, enough K-splits for about four programs per SM."""
    vals = 32 // layout.bits
    if layout.tile_n:
        bn, bkv = layout.tile_n, layout.tile_kv
        steps, tiles = (k // vals) // bkv, triton.cdiv(n, bn)
        int4 = layout.mode == MODE_INT and layout.bits == 4
        target = (4 if int4 and layout.zeros is None else 8) * num_sms(device)
        split = 1
        while tiles * split < target and steps // (split * 2) >= 2:
            split *= 2
        warps = 4 if int4 and layout.zeros is None and n * k >= 1 << 25 else 2
        stages = 3 if layout.zeros is not None else 1
        return {"BN": bn, "BKV": bkv, "SPLIT_K": split, "num_warps": warps, "STAGES": stages}
    stages, programs_per_sm = 1, 4
    if layout.mode == MODE_TABLE:
        bn, bkv, warps, programs_per_sm = 64, 8, 2, 8
    elif layout.bits == 4:
        bn, bkv, warps = 128, 16, 2
    else:
        bn, bkv, warps, stages = 32, 32, 2, 3
    bkv = min(bkv, k // vals)
    while bkv > 1 and (k // vals) % bkv:
        bkv //= 2
    cfg = {"BM": 1, "BN": bn, "BK": bkv * vals}
    split = split_for(1, n, k, cfg, programs_per_sm // 2 * num_sms(device))
    return {"BN": bn, "BKV": bkv, "SPLIT_K": split, "num_warps": warps, "STAGES": stages}


def gemv_h2(
    x: torch.Tensor,
    layout: WQLayout,
    *,
    act_silu_mul: bool = False,
    row_factor: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    options: EngineOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """``x [1, K] @ dequant(W).T (* row_factor) + bias`` (``x [1, 2K]`` gate/up when ``act_silu_mul``)."""
    n, k = layout.out_features, layout.in_features
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty((1, n), device=x.device, dtype=x.dtype)
    if config is None:
        config = _config(n, k, layout, x.device)
        if options.h2_config_edit is not None:
            config = options.h2_config_edit(dict(config), layout)
    cfg = dict(config)
    bn, bkv, split = cfg.pop("BN"), cfg.pop("BKV"), cfg.pop("SPLIT_K")
    if layout.tile_n and (bn, bkv) != (layout.tile_n, layout.tile_kv):
        raise ValueError(f"tiled weights need BN={layout.tile_n}, BKV={layout.tile_kv} (got {bn}, {bkv})")
    cfg.setdefault("STAGES", 1)
    bk = bkv * (32 // layout.bits)
    tiles = triton.cdiv(n, bn)
    split, k_split, ws, cnt = plan_split(split, tiles, n, k, bk, out)
    pairs = _PAIRS[(layout.mode, layout.bits)]
    slots = {
        f"S{p}{side}": (pairs[p][i] if p < len(pairs) else 0) for p in range(4) for i, side in enumerate("LH")
    }
    tp = [0] * 8
    if layout.mode == MODE_TABLE:
        key = (layout.table.data_ptr(), str(x.device))
        if key not in _TABLE_ASM:
            _TABLE_ASM[key] = _table_h2_asm(layout.table)
        asm, tp = _TABLE_ASM[key]
    elif layout.mode == MODE_FP8:
        asm = _ASM_FP8
    elif layout.bits == 4:
        asm = _ASM_INT4
    else:
        asm = _ASM_INT8.replace("MAGIC", "0x64806480" if layout.signed8 else "0x64006400").replace(
            "LUT", "0x6A" if layout.signed8 else "0xEA"
        )
    zc = float(layout.zero_const)
    _gemv_h2_kernel[(tiles * split,)](
        x, layout.w32, layout.scales,
        *or_dummy(layout, layout.zeros, layout.dq_code, layout.dq_nested, layout.dq_offset, layout.bias, row_factor),
        out, ws, cnt,
        n, k, layout.w32.stride(0), layout.scale_stride, k_split, layout.n_groups,
        TILED=bool(layout.tile_n), ASM=asm, GROUP=layout.group, BITS=layout.bits, MODE=layout.mode,
        HAS_ZERO=layout.zeros is not None,
        ZLO=_half_bits(-(1024.0 + zc)), ZHI=_half_bits(-(64.0 + zc)),
        NESTED=layout.dq_code is not None, HAS_BIAS=layout.bias is not None,
        SCALE_MUL=float(layout.scale_mul), HAS_ROWF=row_factor is not None, ACT_SILU_MUL=act_silu_mul,
        SPLIT_K=split, **slots, **{f"TP{i}": v for i, v in enumerate(tp)},
        BN=bn, BKV=bkv, XB=1024, **cfg, **launch_args(x.device, options.pdl),
    )  # fmt: skip
    return out
