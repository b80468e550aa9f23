"""Batch 1-16 products of weight-quantized linears on tensor cores (``mma.sync`` m16n8k16; CUDA only).

Why: the half2 GEMV (``gemv_h2``) spends its ALU work once per activation row, so batch 8 costs 2-2.6x
batch 1; the fp32 dot path of ``wq_matmul`` converts every decoded tile through shared memory. Here the
packed codes are decoded in registers straight into the A fragments of ``mma.sync`` and the activations
are the B fragment: the decode is paid once for up to 8 (16) tokens and the multiply-add is one tensor
core instruction per 256 weights.

Work split. A program owns 16 output rows (one m16 tile) and ``NW`` warps, which take K in steps of
``STEP = 4 * V * VALS`` columns (interleaved, so the warps of a program read neighbouring bytes). In a
step, lane ``(g, t) = (lane // 4, lane % 4)`` loads ``V`` consecutive code words of row ``g`` and of row
``g + 8`` (one 16-byte load each when V = 4): the columns ``t * V * VALS ...`` of the step. The mma's k
order is free as long as A and B agree, so each word's codes feed the lane's k slots in column order:
decoded pair ``(2i, 2i + 1)`` of a word is one A register, and the matching B register is the
activation pair at the same columns, a plain 32-bit piece of the activation row (no shuffles). With
``N`` rows per lane group ``g`` = the token index, the B fragment holds token ``g`` (tokens 8-15: a
second mma per A fragment). NF4 / FP4 in blocks of 32 / 64 at 1-8 tokens (``EngineOptions.mma_two_groups``): a step takes two
consecutive blocks, each lane the same words of two consecutive tiles, and the step's asm keeps the two
blocks' results apart for their scales.

Scales. A step lies in one quantization group (``GROUP % STEP == 0``) or the scale is per row, so the
step's fp32 mma result is scaled once per (row, step): codes enter the tensor cores as exact small
integers (int4 / int8 minus zero, e4m3 values) or as the NF4 / FP4 table value rounded to the
compute dtype, products are exact and accumulate in fp32.

Decoders (PTX, one 32-bit word -> 16-bit pairs in column order):
* int4, bf16: ``prmt`` puts bytes ``i`` of ``w`` and ``w >> 4`` in the two halves, ``lop3`` masks the low
  nibble and ORs 128.0 (``0x4300``), one ``fma`` subtracts 128 + zero (exact): 13 instructions per word;
  fp16 the same with 1024.0 (``0x6400``).
* NF4 / FP4: each byte (a code pair) indexes a shared-memory table of 16-bit value pairs of the compute
  dtype (``prmt`` + ``mad`` + ``ld.shared`` per pair), filled by every program in 16 interleaved copies
  against bank conflicts (``EngineOptions.mma_lut_copies``); one word per step takes the byte-permute
  decoder of ``triton_common.table_asm`` instead (the same values), which balances the ALU against the L1
  data pipe.
* int8, bf16: ``prmt`` of each byte under 2**23 (fp32), subtract 2**23 + zero, ``cvt.rn.bf16x2.f32``;
  fp16: ``prmt`` under 1024.0 and one ``add.f16x2`` per pair.
* e4m3: ``cvt.rn.f16x2.e4m3x2`` and an f16 mma; bf16 activations (W8A8: already e4m3 values, exact in
  fp16) are converted to fp16 in the load.
* plain bf16 / fp16 weights (an unquantized ``nn.Linear``, ``layouts.plain_layout_for``, row-major): no
  decoder, each word is a column pair and two words of rows g and g + 8 are one A fragment
  (``EngineOptions.plain_*``).

Pipelining: each iteration requests the codes of the step ``DEPTH`` iterations ahead (2 for 8-bit codes);
the engine stores the codes in tiles of one warp step (``layouts.mma_tile``), so a step reads 1 KiB
contiguous and the addresses advance by a constant. For 4-bit and e4m3 codes
(``EngineOptions.mma_x_carry``) the step's activation words are loaded one iteration ahead too, in
loop-carried registers: inside the step asm ptxas would sink each 16-byte load next to its mma, four L2
round trips in a row. ``quantize_act``
(W8A8, one token) quantizes the activation row inside the kernel instead of a separate ``act_quant``
launch.

Layout assumption (checked by the CUDA tests against the reference): a 1-D tensor of ``32 * NW``
elements places element ``i`` in thread ``i`` (Triton's default blocked layout), so the lane
arithmetic on ``tl.arange`` names the lane that runs the inline PTX.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantbench.engine.kernels.layouts import (
    ACT_FP8,
    ACT_INT8_TOKEN,
    ACT_LLM_INT8,
    WQLayout,
    mma_words_per_lane,
)
from quantbench.engine.kernels.mma_ptx import (
    D_FP8,
    D_INT4,
    D_INT8_F16,
    D_INT8_F32,
    D_PLAIN,
    D_TABLE,
    X_F16,
    X_FP8,
    X_INT8,
    X_KEEP,
    X_LLM,
    X_REGS,
    load_asm,
    lut_alloc_asm,
    lut_pairs,
    lut_store_asm,
    step_asm,
    sub_x_bytes,
    table_planes,
    x_load_asm,
)
from quantbench.engine.kernels.partials import Partials
from quantbench.engine.kernels.pdl import launch_args, wait_prior
from quantbench.engine.kernels.routing import decoder_kind
from quantbench.engine.kernels.triton_common import (
    bias_like,
    num_sms,
    or_dummy,
    plan_split,
    split_columns,
    store_out,
    word_off,
)
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions

__all__ = ["mma_gemv"]


@triton.jit
def _load_step(addr_g, addr_h, ok_g, ok_h, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(
        asm=ASM,
        constraints="=r,=r,=r,=r,=r,=r,=r,=r,l,l,r,r",
        args=[addr_g, addr_h, ok_g.to(tl.int32), ok_h.to(tl.int32)],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32),
        is_pure=False,
        pack=1,
    )


@triton.jit
def _load_x(addr, ok, ASM: tl.constexpr):
    """The 16 activation words of one lane's step (zeros where ``ok`` is false)."""
    return tl.inline_asm_elementwise(
        asm=ASM,
        constraints="=r," * 16 + "l,r",
        args=[addr, ok.to(tl.int32)],
        dtype=(tl.int32,) * 16,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _asm_i32(a, b, ASM: tl.constexpr):
    """A side-effecting one-output asm of two int32 operands (the shared pair table's set-up)."""
    return tl.inline_asm_elementwise(
        asm=ASM, constraints="=r,r,r", args=[a, b], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _half2(v, DT: tl.constexpr):
    """fp32 ``v`` as a pair of the 16-bit compute dtype (both halves), in an int32."""
    if DT == 0:
        h = v.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    else:
        h = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@triton.jit
def _zero_word(z, KIND: tl.constexpr, DT: tl.constexpr):
    """The decoder's zero operand for zero point ``z`` (fp32): -(magic + z) as pairs, or 2**23 + z."""
    if KIND == 0:
        if DT == 0:
            return _half2(-(z + 128.0), 0)
        else:
            return _half2(-(z + 1024.0), 1)
    elif KIND == 2:
        return (z + 8388608.0).to(tl.int32, bitcast=True)
    else:
        return _half2(-(z + 1024.0), 1)


@triton.jit
def _scale_at(s_ptr, dqc_ptr, dqn_ptr, dqo_ptr, rows, g, ok, stride_sn, n_groups, TN: tl.constexpr,
              NESTED: tl.constexpr, SCALE_MUL: tl.constexpr):  # fmt: skip
    """fp32 scale of (row, group g); 0 where ``ok`` is false (the step then adds nothing)."""
    if TN == 0:
        idx = rows * stride_sn + g
    else:
        idx = ((rows // TN) * n_groups + g) * TN + rows % TN
    raw = tl.load(s_ptr + idx, mask=ok, other=0)
    if NESTED:  # double-quantized absmax: the nested statistics follow the logical (row-major) block number
        nest = tl.load(dqn_ptr + (rows * stride_sn + g) // 256, mask=ok, other=0.0)
        return tl.where(ok, tl.load(dqc_ptr + raw.to(tl.int32)) * nest + tl.load(dqo_ptr), 0.0)
    return raw.to(tl.float32) * SCALE_MUL


@triton.jit
def _zero_at(z_ptr, rows, g, ok, stride_sn, n_groups, TN: tl.constexpr):
    if TN == 0:
        idx = rows * stride_sn + g
    else:
        idx = ((rows // TN) * n_groups + g) * TN + rows % TN
    return tl.load(z_ptr + idx, mask=ok, other=0).to(tl.float32)


@triton.jit
def _mma_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, dqc_ptr, dqn_ptr, dqo_ptr, b_ptr, rf_ptr, o_ptr, ws_ptr, cnt_ptr, lut_ptr,
    M, N, K, stride_xm, stride_om, stride_wn, stride_sn, n_groups, steps_per_split, THR,
    P0, P1, P2, P3, P4, P5, P6, P7,
    STEP_ASM: tl.constexpr, LOAD_ASM: tl.constexpr, KIND: tl.constexpr, DT: tl.constexpr,
    TN: tl.constexpr, TKV: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
    ZERO_CONST: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_MUL: tl.constexpr,
    HAS_ROWF: tl.constexpr, SPLIT_K: tl.constexpr, V: tl.constexpr, NB: tl.constexpr, NW: tl.constexpr,
    XQ: tl.constexpr, BX: tl.constexpr, DEPTH: tl.constexpr, XC: tl.constexpr, X_ASM: tl.constexpr,
    LUT_R: tl.constexpr, LUT_ALLOC: tl.constexpr, LUT_STORE: tl.constexpr, SUBS: tl.constexpr, PARTIAL: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    VALS: tl.constexpr = 32 // BITS
    STEP: tl.constexpr = SUBS * 4 * V * VALS  # columns per warp step (SUBS groups of V words per lane)
    KW = K // VALS
    pid = tl.program_id(0)
    tile = pid // SPLIT_K
    ks = pid % SPLIT_K

    tid = tl.arange(0, 32 * NW)
    lane = tid % 32
    warp = tid // 32
    g = lane // 4
    t = lane % 4
    row_g = (tile * 16 + g).to(tl.int64)
    row_h = row_g + 8
    ok_g = row_g < N
    ok_h = row_h < N
    n_steps = K // STEP
    s_lo = ks * steps_per_split
    s_hi = tl.minimum(n_steps, s_lo + steps_per_split)
    n_iter = tl.cdiv(s_hi - s_lo, NW)

    # Codes are row-major or tiled in this kernel's own steps (routing.mma_takes), so a warp's code addresses
    # advance by a constant per step.
    STEP_BYTES: tl.constexpr = SUBS * 4 * (4 * V if TN == 0 else TN * TKV)
    s = s_lo + warp
    wcol = s * (4 * V * SUBS) + t * V
    ptr_g = (w_ptr + word_off(row_g, wcol, stride_wn, KW, TN, TKV)).to(tl.int64, bitcast=True)
    ptr_h = (w_ptr + word_off(row_h, wcol, stride_wn, KW, TN, TKV)).to(tl.int64, bitcast=True)
    # the first DEPTH steps' codes are requested before waiting on the previous kernel (they are constant)
    w0, w1, w2, w3, w4, w5, w6, w7 = _load_step(ptr_g, ptr_h, (s < s_hi) & ok_g, (s < s_hi) & ok_h, LOAD_ASM)
    if DEPTH == 2:
        s1 = s + NW
        p1g = ptr_g + NW * STEP_BYTES
        p1h = ptr_h + NW * STEP_BYTES
        u0, u1, u2, u3, u4, u5, u6, u7 = _load_step(
            p1g, p1h, (s1 < s_hi) & ok_g, (s1 < s_hi) & ok_h, LOAD_ASM
        )
    # NF4 / FP4: the shared pair table (a constant: filled before waiting on the previous kernel)
    lut_lane = tid * 0
    if LUT_R > 0:
        lut_at = _asm_i32(tid, tid, LUT_ALLOC)
        for v0 in tl.static_range(0, 256, 32 * NW):
            _asm_i32(tl.load(lut_ptr + v0 + tid), lut_at + (v0 + tid) * (4 * LUT_R), LUT_STORE)
        tl.debug_barrier()
        lut_lane = lut_at + (lane % LUT_R) * 4
    wait_prior(PDL)

    # XQ > 0 (one token): quantize the activations here, as fused.act_quant would (the per-token scale from
    # this program's own pass over the whole row, L2-resident); the step multiplies by 1 / scale.
    inv = 1.0
    rfv = 1.0
    if XQ > 0:
        amax = 0.0
        for c0 in range(0, K, BX):
            cols = c0 + tl.arange(0, BX)
            ax = tl.abs(tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32))
            if XQ == 4:  # LLM.int8: outlier columns do not set the scale
                ax = tl.where(ax >= THR, 0.0, ax)
            amax = tl.maximum(amax, tl.max(ax, 0))
        if XQ == 2:  # e4m3: scale = amax / 448
            rfv = tl.math.div_rn(amax, 448.0)
            inv = tl.math.div_rn(1.0, tl.where(rfv == 0.0, 1.0, rfv))
        elif XQ == 3:  # SmoothQuant int8: scale = max(amax / 127, 1e-8)
            rfv = tl.maximum(tl.math.div_rn(amax, 127.0), 1e-8)
            inv = tl.math.div_rn(1.0, rfv)
        else:  # LLM.int8: x * (127 / amax), factor amax / 127 (1 and 1 for an all-zero row)
            inv = tl.where(amax == 0.0, 1.0, tl.math.div_rn(1.0, amax) * 127.0)  # torch's 127 / t
            rfv = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, 127.0))

    zg = tl.full((32 * NW,), 0, tl.int32)
    zh = tl.full((32 * NW,), 0, tl.int32)
    if KIND == 0 or KIND == 2 or KIND == 3:
        if not HAS_ZERO:
            zg = _zero_word(zg.to(tl.float32) + ZERO_CONST, KIND, DT)
            zh = zg
        elif GROUP == 0:
            zg = _zero_word(_zero_at(z_ptr, row_g, 0, ok_g, stride_sn, n_groups, 0), KIND, DT)
            zh = _zero_word(_zero_at(z_ptr, row_h, 0, ok_h, stride_sn, n_groups, 0), KIND, DT)
    tok0 = g
    tok1 = g + 8
    col = s * STEP + t * (V * VALS)  # this lane's first activation column
    x_addr0 = (x_ptr + tok0.to(tl.int64) * stride_xm + col).to(tl.int64, bitcast=True)
    x_addr1 = (x_ptr + tok1.to(tl.int64) * stride_xm + col).to(tl.int64, bitcast=True)
    X_INC: tl.constexpr = NW * STEP * 2  # bytes of activations per iteration (16-bit)
    acc0 = tl.zeros((32 * NW,), tl.float32)
    acc1 = tl.zeros((32 * NW,), tl.float32)
    acc2 = tl.zeros((32 * NW,), tl.float32)
    acc3 = tl.zeros((32 * NW,), tl.float32)
    acc4 = tl.zeros((32 * NW,), tl.float32)
    acc5 = tl.zeros((32 * NW,), tl.float32)
    acc6 = tl.zeros((32 * NW,), tl.float32)
    acc7 = tl.zeros((32 * NW,), tl.float32)
    # XC: each step's activation words are loaded one iteration ahead, all four 16-byte loads together
    # (inside the step asm, ptxas sinks each load next to its mma: four L2 round trips in a row)
    c0, c1, c2, c3, c4, c5, c6, c7 = zg * 0, zg * 0, zg * 0, zg * 0, zg * 0, zg * 0, zg * 0, zg * 0
    c8, c9, c10, c11, c12, c13, c14, c15 = c0, c0, c0, c0, c0, c0, c0, c0
    if XC:
        c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15 = _load_x(
            x_addr0, (s < s_hi) & (tok0 < M), X_ASM
        )
    for _ in range(n_iter):
        live = s < s_hi
        if XC:
            e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15 = _load_x(
                x_addr0 + X_INC, (s + NW < s_hi) & (tok0 < M), X_ASM
            )
        s_pre = s + DEPTH * NW  # the step requested now, used DEPTH iterations later
        ptr_g += NW * STEP_BYTES
        ptr_h += NW * STEP_BYTES
        pre_g = ptr_g + (DEPTH - 1) * NW * STEP_BYTES
        pre_h = ptr_h + (DEPTH - 1) * NW * STEP_BYTES
        n0, n1, n2, n3, n4, n5, n6, n7 = _load_step(pre_g, pre_h, (s_pre < s_hi) & ok_g, (s_pre < s_hi) & ok_h,
                                                    LOAD_ASM)  # fmt: skip
        if GROUP > 0:
            grp = (s * STEP) // GROUP
            sg = _scale_at(s_ptr, dqc_ptr, dqn_ptr, dqo_ptr, row_g, grp, live & ok_g, stride_sn, n_groups, TN,
                           NESTED, SCALE_MUL)  # fmt: skip
            sh = _scale_at(s_ptr, dqc_ptr, dqn_ptr, dqo_ptr, row_h, grp, live & ok_h, stride_sn, n_groups, TN,
                           NESTED, SCALE_MUL)  # fmt: skip
            if HAS_ZERO:
                zg = _zero_word(_zero_at(z_ptr, row_g, grp, live & ok_g, stride_sn, n_groups, TN), KIND, DT)
                zh = _zero_word(_zero_at(z_ptr, row_h, grp, live & ok_h, stride_sn, n_groups, TN), KIND, DT)
            if SUBS == 2:  # the step's second group (no zero points: mma_gemv's choice)
                sg2 = _scale_at(s_ptr, dqc_ptr, dqn_ptr, dqo_ptr, row_g, grp + 1, live & ok_g, stride_sn, n_groups,
                                TN, NESTED, SCALE_MUL)  # fmt: skip
                sh2 = _scale_at(s_ptr, dqc_ptr, dqn_ptr, dqo_ptr, row_h, grp + 1, live & ok_h, stride_sn, n_groups,
                                TN, NESTED, SCALE_MUL)  # fmt: skip
        else:
            sg = live.to(tl.float32)  # a dead step's zero activations already give 0; keep it exact
            sh = sg
        d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
            asm=STEP_ASM,
            constraints="=f,=f,=f,=f,=f,=f,=f,=f,r,r,r,r,r,r,r,r,l,l,r,r,r,r,r,r,r,r,r,r,r,r,r,r" + ",r" * 17,
            args=[w0, w1, w2, w3, w4, w5, w6, w7, x_addr0, x_addr1,
                  (live & (tok0 < M)).to(tl.int32), (live & (tok1 < M)).to(tl.int32), zg, zh,
                  zg * 0 + P0, zg * 0 + P1, zg * 0 + P2, zg * 0 + P3, zg * 0 + P4, zg * 0 + P5, zg * 0 + P6,
                  zg * 0 + P7, (zg * 0 + inv).to(tl.int32, bitcast=True),
                  (zg * 0 + THR).to(tl.int32, bitcast=True), c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12,
                  c13, c14, c15, lut_lane],
            dtype=(tl.float32,) * 8,
            is_pure=False,
            pack=1,
        )  # fmt: skip
        acc0 += d0 * sg
        acc1 += d1 * sg
        acc2 += d2 * sh
        acc3 += d3 * sh
        if SUBS == 2:
            acc0 += d4 * sg2
            acc1 += d5 * sg2
            acc2 += d6 * sh2
            acc3 += d7 * sh2
        elif NB == 2:
            acc4 += d4 * sg
            acc5 += d5 * sg
            acc6 += d6 * sh
            acc7 += d7 * sh
        if DEPTH == 2:
            w0, w1, w2, w3, w4, w5, w6, w7 = u0, u1, u2, u3, u4, u5, u6, u7
            u0, u1, u2, u3, u4, u5, u6, u7 = n0, n1, n2, n3, n4, n5, n6, n7
        else:
            w0, w1, w2, w3, w4, w5, w6, w7 = n0, n1, n2, n3, n4, n5, n6, n7
        if XC:
            c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15 = (
                e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15)  # fmt: skip
        s += NW
        x_addr0 += X_INC
        x_addr1 += X_INC

    # sum the warps (lane l of every warp holds the same outputs), then lane l of the sum:
    # rows tile * 16 + g (c0, c1) / + 8 (c2, c3), tokens 2t, 2t + 1 (+ 8 in block 1)
    lane_o = tl.arange(0, 32)
    g_o = lane_o // 4
    t_o = lane_o % 4
    sel = tl.arange(0, 8)[None, :]
    vals = tl.where(sel == 0, tl.sum(tl.reshape(acc0, (NW, 32)), 0)[:, None], 0.0)
    vals += tl.where(sel == 1, tl.sum(tl.reshape(acc1, (NW, 32)), 0)[:, None], 0.0)
    vals += tl.where(sel == 2, tl.sum(tl.reshape(acc2, (NW, 32)), 0)[:, None], 0.0)
    vals += tl.where(sel == 3, tl.sum(tl.reshape(acc3, (NW, 32)), 0)[:, None], 0.0)
    if NB == 2:
        vals += tl.where(sel == 4, tl.sum(tl.reshape(acc4, (NW, 32)), 0)[:, None], 0.0)
        vals += tl.where(sel == 5, tl.sum(tl.reshape(acc5, (NW, 32)), 0)[:, None], 0.0)
        vals += tl.where(sel == 6, tl.sum(tl.reshape(acc6, (NW, 32)), 0)[:, None], 0.0)
        vals += tl.where(sel == 7, tl.sum(tl.reshape(acc7, (NW, 32)), 0)[:, None], 0.0)
    rows = tile * 16 + g_o[:, None] + 8 * ((sel // 2) % 2)  # [32, 8]
    toks = 2 * t_o[:, None] + sel % 2 + 8 * (sel // 4)
    omask = (rows < N) & (toks < M) & (sel < 4 * NB)
    if GROUP == 0:
        vals = vals * (
            tl.load(s_ptr + rows.to(tl.int64) * stride_sn, mask=omask, other=0.0).to(tl.float32) * SCALE_MUL
        )
    if HAS_ROWF:
        vals = vals * tl.load(rf_ptr + toks, mask=omask, other=0.0)
    if XQ > 0:
        vals = vals * rfv
    o_off = toks.to(tl.int64) * stride_om + rows
    ws_off = toks.to(tl.int64) * N + rows
    if PARTIAL:  # each split's fp32 partial to its own plane of the output: the consumer sums them
        if HAS_BIAS:
            vals += tl.where(ks == 0, bias_like(vals, b_ptr, rows, omask), 0.0)
        tl.store(o_ptr + ks * (M * N) + ws_off, vals, mask=omask)
    else:
        store_out(vals, omask, o_off, ws_off, M * N, rows, omask, b_ptr, o_ptr, ws_ptr, cnt_ptr, tile, ks,
                   HAS_BIAS, SPLIT_K)  # fmt: skip


_ASM: dict[tuple, tuple[str, ...]] = {}
# per layout.act_quant (layouts.ACT_*): the kernel's XQ (2 e4m3, 3 SmoothQuant int8, 4 LLM.int8) and the
# step's activation mode when the GEMV quantizes one token itself
_XQ = {ACT_FP8: (2, X_FP8), ACT_INT8_TOKEN: (3, X_INT8), ACT_LLM_INT8: (4, X_LLM)}
# ``EngineOptions.mma_x_carry`` names -> decoder kinds
_DECODERS = {
    "int4": {D_INT4},
    "table": {D_TABLE},
    "int8": {D_INT8_F32, D_INT8_F16},
    "fp8": {D_FP8},
    "plain": {D_PLAIN},
}
_LUTS: dict[tuple, torch.Tensor] = {}


def _lut_tensor(table: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (table.data_ptr(), dtype, str(device))
    if key not in _LUTS:
        _LUTS[key] = torch.tensor(lut_pairs(table, dtype), dtype=torch.int32, device=device)
    return _LUTS[key]


def _subs(kind: int, layout: WQLayout, m: int, options: EngineOptions = DEFAULT_OPTIONS) -> int:
    """Sub-steps (quantization groups) per warp step of this call: NF4 / FP4 groups of 64 (32) columns at
    1-8 tokens take two consecutive groups (the codes of two consecutive tiles), halving the per-step
    work (addresses, flags, loads issued) per code (``EngineOptions.mma_two_groups``)."""
    words = mma_words_per_lane(layout)
    two = 2 * 4 * words * (32 // layout.bits)
    ok = (
        options.mma_two_groups and kind == D_TABLE and m <= 8 and words <= 2 and layout.in_features % two == 0
    )
    return 2 if ok and layout.group > 0 and layout.zeros is None else 1


def _config(
    m: int, n: int, k: int, layout: WQLayout, device: torch.device, options: EngineOptions = DEFAULT_OPTIONS
) -> dict:
    """Warps per program and K-splits: about four 4-warp programs per SM, each split keeping at least
    two steps per warp; steps of codes in flight: two for 8- and 16-bit codes, ``mma_depth_4bit`` for
    4-bit ones."""
    words = mma_words_per_lane(layout)
    # the activation dtype only picks between int8 decoders, except that plain layouts take their own
    kind = decoder_kind(layout, layout.plain_dtype or torch.bfloat16)
    step = 4 * words * (32 // layout.bits) * _subs(kind, layout, m, options)
    nw = options.mma_table_warps if kind == D_TABLE else 4
    tiles = n // 16
    steps = k // step
    split = 1
    while tiles * split < 4 * num_sms(device) and steps // (split * 2) >= 2 * nw:
        split *= 2
    depth = options.mma_depth_4bit if layout.bits == 4 else 2
    return {"NW": nw, "SPLIT_K": split, "DEPTH": depth}


def mma_gemv(
    x: torch.Tensor,
    layout: WQLayout,
    *,
    act_silu_mul: bool = False,
    row_factor: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    quantize_act: bool = False,
    partials: bool = False,
    options: EngineOptions = DEFAULT_OPTIONS,
) -> torch.Tensor | Partials:
    """``x [M, K] @ dequant(W).T (* row_factor[:, None]) + bias`` for M <= 16 (see the module doc);
    ``x [M, 2K]`` gate/up when ``act_silu_mul`` (``fused.silu_mul`` first: the GEMV's activation loads
    take the product as it is).

    ``quantize_act`` (one token, a W8A8 layout): ``x`` is the raw activation row; the kernel quantizes it
    as ``fused.act_quant`` does and applies the per-token factor itself (no ``row_factor``).

    ``partials`` (the engine's decode step, with ``EngineOptions.partials``): no ``out``; each K-split stores
    its fp32 partial and the result is a :class:`Partials` for a consumer that sums them
    (``kernels/partials.py``)."""
    if act_silu_mul:
        from quantbench.engine.kernels.fused import silu_mul

        x = silu_mul(x, options=options)
    m = x.shape[0]
    if quantize_act and (m != 1 or row_factor is not None or not layout.act_quant):
        raise ValueError("quantize_act needs one token, a W8A8 layout and no row_factor")
    n, k = layout.out_features, layout.in_features
    partials = partials and options.partials and out is None
    if out is None and not partials:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    kind = decoder_kind(layout, x.dtype)
    words = mma_words_per_lane(layout)
    if config is None:
        config = _config(m, n, k, layout, x.device, options)
        if options.mma_config_edit is not None:
            config = options.mma_config_edit(dict(config), layout)
    cfg = dict(config)
    nw, split, depth = cfg.pop("NW"), cfg.pop("SPLIT_K"), cfg.pop("DEPTH", 1)
    dt = "bf16" if x.dtype == torch.bfloat16 else "f16"
    blocks = 1 if m <= 8 else 2
    if quantize_act:
        xq, x_mode = _XQ[layout.act_quant]
    else:
        xq, x_mode = 0, X_F16 if kind == D_FP8 and dt == "bf16" else X_KEEP
    subs = _subs(kind, layout, m, options)
    x_words = words * subs * (32 // layout.bits) // 2  # activation words per lane and step (one token block)
    carried = any(kind in _DECODERS[name] for name in options.mma_x_carry)
    xc = carried and blocks == 1 and x_words <= X_REGS
    copies = options.mma_lut_copies if kind == D_TABLE and 32 * nw <= 256 else 0
    permute = min(options.mma_lut_permute, 2 * words * subs) if copies else 0
    # bytes from one group's codes to the next one's: the next tile, or the next words of the row
    sub_bytes = 4 * (layout.tile_n * layout.tile_kv if layout.tile_n else 4 * words)
    sub_x = sub_x_bytes(words, layout.bits)
    make_step = options.mma_step_asm or step_asm
    key = (kind, layout.bits, words, blocks, dt, layout.signed8, x_mode, xc, copies, subs, sub_bytes, permute,
           make_step)  # fmt: skip
    if key not in _ASM:
        _ASM[key] = (
            make_step(kind, layout.bits, words * subs, blocks, dt, x_mode, layout.signed8, x_regs=xc,
                     lut_copies=copies, subs=subs, lut_permute=permute),
            load_asm(words * subs, subs, sub_bytes),
            x_load_asm(x_words, subs, sub_x) if xc else "",
            lut_alloc_asm(copies) if copies else "",
            lut_store_asm(copies) if copies else "",
        )  # fmt: skip
    step_text, load_text, x_text, alloc_text, store_text = _ASM[key]
    planes = table_planes(layout.table, x.dtype) if kind == D_TABLE else [0] * 8
    lut = _lut_tensor(layout.table, x.dtype, x.device) if copies else layout.w32
    step = 4 * words * (32 // layout.bits) * subs
    tiles = n // 16
    if partials:
        split, k_split = split_columns(split, k, step)
        out = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
        ws = cnt = out
    else:
        split, k_split, ws, cnt = plan_split(split, tiles, m * n, k, step, out)
    _mma_gemv_kernel[(tiles * split,)](
        x, layout.w32, layout.scales,
        *or_dummy(layout, layout.zeros, layout.dq_code, layout.dq_nested, layout.dq_offset, layout.bias, row_factor),
        out, ws, cnt, lut,
        m, n, k, x.stride(0), out.stride(0), layout.w32.stride(0), layout.scale_stride, layout.n_groups, k_split // step,
        float(layout.threshold) if layout.threshold > 0 else float("inf"), *planes,
        STEP_ASM=step_text, LOAD_ASM=load_text, KIND=kind, DT=0 if dt == "bf16" else 1,
        TN=layout.tile_n, TKV=layout.tile_kv, GROUP=layout.group, BITS=layout.bits,
        HAS_ZERO=layout.zeros is not None, ZERO_CONST=float(layout.zero_const), NESTED=layout.dq_code is not None,
        HAS_BIAS=layout.bias is not None, SCALE_MUL=float(layout.scale_mul), HAS_ROWF=row_factor is not None,
        SPLIT_K=split, V=words, NB=blocks, NW=nw, XQ=xq, DEPTH=depth, XC=xc, X_ASM=x_text,
        LUT_R=copies, LUT_ALLOC=alloc_text, LUT_STORE=store_text, SUBS=subs, PARTIAL=partials, BX=min(4096, triton.next_power_of_2(k)), num_warps=nw,
        **cfg, **launch_args(x.device, options.pdl),
    )  # fmt: skip
    return Partials(out, x.dtype) if partials else out
