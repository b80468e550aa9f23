"""Small fused Triton kernels of the decode step: residual add + RMSNorm, RoPE + KV-cache write,
decode attention (GQA, online softmax) and SiLU-gate, plus activation quantization for W8A8 layers.

Numerics follow HF's Llama/Mistral/Qwen2 modules in the model dtype (bf16/fp16): the residual add is
rounded to the model dtype, RMSNorm is computed in fp32 and rounded before the weight multiply, RoPE
is computed in fp32 and rounded once, attention scores/softmax are fp32 with the probabilities
rounded to the model dtype for the ``P @ V`` product (as flash attention does).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from quantbench.engine.kernels.layouts import ACT_LLM_INT8, CODE_DTYPE_OF_ACT, ROW_TILE_MAX, WQLayout
from quantbench.engine.kernels.partials import Partials, load_summed, parts_args
from quantbench.engine.kernels.pdl import launch_args, wait_prior
from quantbench.engine.kernels.triton_common import (
    WS_FLOATS,
    WS_TILES,
    attend_block,
    kv_block,
    num_sms,
    rint,
    rope_rows,
    silu_gate,
    workspace,
)
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions

_CODE_DTYPES = frozenset(CODE_DTYPE_OF_ACT.values())


class OutlierColumns(NamedTuple):
    """LLM.int8's outlier columns of one product's input, recorded by the kernel that writes the input:
    ``colmax [K]`` int32 float bits (zeroed, then ``|x|`` of each value at or over ``threshold``)."""

    colmax: torch.Tensor
    threshold: float


def _rows_mode(m: int, k: int, options: EngineOptions) -> bool:
    """``act_quant`` quantizes each token by one whole-row program (LLM.int8: after the column maxima)."""
    whole = m == 1 or (m > 64 and 0 < options.act_rows_min_m <= m)
    return whole and triton.next_power_of_2(k) <= ROW_TILE_MAX


def outlier_columns(
    m: int, layout: WQLayout, device: torch.device, options: EngineOptions = DEFAULT_OPTIONS
) -> OutlierColumns | None:
    """Where ``act_quant`` of ``m`` tokens into ``layout`` would make a pass over the activations for
    LLM.int8's outlier columns (more than one token, whole-row programs), a zeroed buffer for the kernel
    producing them to record those columns in instead (``options.act_producer_colmax``); else None."""
    if not (
        options.act_producer_colmax
        and m > 1
        and layout.act_quant == ACT_LLM_INT8
        and layout.threshold > 0
        and _rows_mode(m, layout.in_features, options)
    ):
        return None
    colmax = torch.zeros((layout.in_features,), device=device, dtype=torch.int32)
    return OutlierColumns(colmax, float(layout.threshold))


def record_args(outliers: OutlierColumns | None, placeholder: torch.Tensor) -> tuple[tuple, dict]:
    """A writing kernel's recording arguments ``(colmax, threshold)`` (``placeholder`` for the buffer when
    it records nothing) and its ``COLMAX`` switch, for ``outliers``."""
    if outliers is None:
        return (placeholder, 0.0), {"COLMAX": False}
    return (outliers.colmax, outliers.threshold), {"COLMAX": True}


@triton.jit
def record_tile(colmax_ptr, rmask, cols, cmask, y, threshold):
    """LLM.int8 record of a ``[tokens, columns]`` tile of a product's input as a kernel writes it (``cols``
    its column indices, ``rmask`` / ``cmask`` the tokens / columns written): raise ``colmax[col]`` (int32
    float bits, zeroed first) to the column's largest ``|y|`` at or over the threshold (only
    ``colmax >= threshold`` is ever read, so other columns stay 0). One atomic per column."""
    a = tl.where(rmask[:, None] & cmask[None, :], tl.abs(y.to(tl.float32)), 0.0)
    cm = tl.max(tl.where(a >= threshold, a, 0.0), axis=0)
    tl.atomic_max(colmax_ptr + cols, cm.to(tl.int32, bitcast=True), mask=cm > 0.0, sem="relaxed")


@triton.jit
def _record_row(colmax_ptr, cols, cmask, y, threshold):
    """``record_tile`` of one token's values ``y`` (a kernel writing one row, or a block of one)."""
    record_tile(colmax_ptr, tl.full((1,), 1, tl.int1), cols, cmask, y[None, :], threshold)


@triton.jit
def _add_rmsnorm_kernel(
    h_ptr, r_ptr, w_ptr, o_ptr, cm_ptr, threshold, D, stride_h, stride_r, stride_o, eps, r_plane,
    HAS_RES: tl.constexpr, R_PARTS: tl.constexpr, COLMAX: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)  # a weight: may be read before the wait
    wait_prior(PDL)
    h = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = load_summed(r_ptr, row * stride_r + offs, mask, r_plane, R_PARTS, h_ptr.dtype.element_ty)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
        tl.store(h_ptr + row * stride_h + offs, h, mask=mask)
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, axis=0) / D
    normed = (hf * tl.math.rsqrt(var + eps)).to(h.dtype)
    y = (normed.to(tl.float32) * w.to(tl.float32)).to(h.dtype)
    tl.store(o_ptr + row * stride_o + offs, y, mask=mask)
    if COLMAX:
        _record_row(cm_ptr, offs, mask, y, threshold)


def add_rmsnorm(
    h: torch.Tensor,
    residual: torch.Tensor | Partials | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    options: EngineOptions = DEFAULT_OPTIONS,
    outliers: OutlierColumns | None = None,
) -> torch.Tensor:
    """``h += residual`` (in place, rounded to h's dtype), then ``out = rmsnorm(h) * weight``; 2-D tensors
    (the residual may be a GEMV's split-K partials). ``outliers``: also record out's LLM.int8 outlier
    columns there (``outlier_columns``)."""
    rows, d = h.shape
    res, stride_r, r_parts, r_plane = parts_args(residual if residual is not None else h)
    records, switches = record_args(outliers, out)
    _add_rmsnorm_kernel[(rows,)](
        h,
        res,
        weight,
        out,
        *records,
        d,
        h.stride(0),
        stride_r,
        out.stride(0),
        eps,
        r_plane,
        HAS_RES=residual is not None,
        R_PARTS=r_parts,
        **switches,
        BLOCK=triton.next_power_of_2(d),
        num_warps=8 if d >= 4096 else 4,
        **launch_args(h.device, options.pdl),
    )
    return out


@triton.jit
def _silu_mul_kernel(x_ptr, o_ptr, cm_ptr, threshold, inter, stride_x, stride_o, x_plane,
                     X_PARTS: tl.constexpr, COLMAX: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):  # fmt: skip
    wait_prior(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    dt = o_ptr.dtype.element_ty
    g = load_summed(x_ptr, row * stride_x + offs, mask, x_plane, X_PARTS, dt)
    u = load_summed(x_ptr, row * stride_x + inter + offs, mask, x_plane, X_PARTS, dt)
    y = silu_gate(g, u)
    tl.store(o_ptr + row * stride_o + offs, y, mask=mask)
    if COLMAX:
        _record_row(cm_ptr, offs, mask, y, threshold)


def silu_mul(
    gate_up: torch.Tensor | Partials,
    out: torch.Tensor | None = None,
    options: EngineOptions = DEFAULT_OPTIONS,
    outliers: OutlierColumns | None = None,
) -> torch.Tensor:
    """``silu(gate) * up`` of a ``[M, 2I]`` gate/up output (or its split-K partials), rounded like HF's two
    bf16 ops. ``outliers``: also record the result's LLM.int8 outlier columns there (``outlier_columns``)."""
    rows, two_i = gate_up.shape
    inter = two_i // 2
    if out is None:
        out = torch.empty((rows, inter), device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    x, stride_x, x_parts, x_plane = parts_args(gate_up)
    records, switches = record_args(outliers, out)
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
        x, out, *records, inter, stride_x, out.stride(0), x_plane, X_PARTS=x_parts, **switches, BLOCK=block,
        **launch_args(gate_up.device, options.pdl),
    )  # fmt: skip
    return out


@triton.jit(do_not_specialize=["T"])
def _rope_cache_prefill_kernel(
    qkv_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, start_ptr, pos_ptr,
    T, stride_qkv_row, stride_qb, stride_qh, stride_qt, stride_cb, stride_ch, stride_ct,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HEAD0: tl.constexpr, GIVEN_POS: tl.constexpr,
):  # fmt: skip
    """One program per (token, head among q + k + v heads from ``HEAD0`` on): rotate q/k, write q to its
    buffer, k/v to cache. The position is ``t - start[b]`` (left padding) or, with ``GIVEN_POS``,
    ``pos [B, T]``'s."""
    tok = tl.program_id(0)
    head = tl.program_id(1) + HEAD0
    b = tok // T
    t = tok % T
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, HALF)
    src = qkv_ptr + tok.to(tl.int64) * stride_qkv_row + head * D
    x1 = tl.load(src + d)
    x2 = tl.load(src + HALF + d)
    if head < H + HKV:
        if GIVEN_POS:
            pos = tl.load(pos_ptr + tok)
        else:
            pos = tl.maximum(t - tl.load(start_ptr + b), 0)
        c = tl.load(cos_ptr + pos * HALF + d)
        s = tl.load(sin_ptr + pos * HALF + d)
        y1, y2 = rope_rows(x1.to(tl.float32), x2.to(tl.float32), c, s)
        y1 = y1.to(x1.dtype)
        y2 = y2.to(x1.dtype)
        if head < H:
            dst = q_ptr + b.to(tl.int64) * stride_qb + head * stride_qh + t * stride_qt
        else:
            dst = k_ptr + b.to(tl.int64) * stride_cb + (head - H) * stride_ch + t * stride_ct
        tl.store(dst + d, y1)
        tl.store(dst + HALF + d, y2)
    else:
        dst = v_ptr + b.to(tl.int64) * stride_cb + (head - H - HKV) * stride_ch + t * stride_ct
        tl.store(dst + d, x1)
        tl.store(dst + HALF + d, x2)


def rope_cache_prefill(
    qkv: torch.Tensor,
    q_out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    start: torch.Tensor,
    n_heads: int,
    n_kv: int,
    head_dim: int,
) -> None:
    """qkv ``[B*T, (H + 2*HKV) * D]`` -> ``q_out [B, H, T, D]`` (rotated), cache ``[B, HKV, S, D]`` rows 0..T-1."""
    b, _, t, _ = q_out.shape
    _rope_cache_prefill_kernel[(b * t, n_heads + 2 * n_kv)](
        qkv, q_out, k_cache, v_cache, cos, sin, start, start, t, qkv.stride(0),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=n_heads, HKV=n_kv, D=head_dim, HEAD0=0, GIVEN_POS=False, num_warps=1,
    )  # fmt: skip


def rope_kv(
    qkv: torch.Tensor,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    n_heads: int,
    n_kv: int,
    head_dim: int,
) -> None:
    """The k / v heads of qkv ``[B*T, (H + 2*HKV) * D]`` at ``positions [B, T]`` (contiguous) -> ``k_out``
    (rotated) and ``v_out`` ``[B, HKV, S, D]``, positions 0..T-1 of S."""
    b, t = positions.shape
    _rope_cache_prefill_kernel[(b * t, 2 * n_kv)](
        qkv, k_out, k_out, v_out, cos, sin, positions, positions, t, qkv.stride(0),
        0, 0, 0, k_out.stride(0), k_out.stride(1), k_out.stride(2),
        H=n_heads, HKV=n_kv, D=head_dim, HEAD0=n_heads, GIVEN_POS=True, num_warps=1,
    )  # fmt: skip


@triton.jit
def _decode_attention_kernel(
    qkv_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, len_ptr, start_ptr, o_ptr, ws_ptr, cnt_ptr,
    stride_len, stride_qkv_row, stride_cb, stride_ch, stride_ct, stride_o_row, sm_scale, chunk, qkv_plane,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GP: tl.constexpr, BS: tl.constexpr,
    SPLITS: tl.constexpr, QKV_PARTS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One program per (sequence, kv head, split of the cache): RoPE for the new q/k, attention over the
    split's cached positions in [start, L) with an online softmax; the last split also takes the new
    token (kept in registers) and writes it to the cache. With SPLITS > 1 each split leaves its (max,
    sum, weighted values) in ``ws`` and the last one to finish (atomic counter) combines them: at batch 1
    a few kv heads alone would leave most of the GPU idle while they walk the whole cache.

    Before waiting on the qkv product, a program loads what no kernel of this step writes: the cache
    length, the RoPE row and its first block of cached keys / values (positions < L, written by earlier
    steps), so its first DRAM round trip overlaps the product instead of following it."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    G: tl.constexpr = H // HKV
    HALF: tl.constexpr = D // 2
    L = tl.load(len_ptr + b * stride_len)  # positions already in the cache; the new token goes to index L
    st = tl.load(start_ptr + b)  # left padding of this sequence
    pos = tl.maximum(L - st, 0)
    g = tl.arange(0, GP)
    gmask = g < G
    dh = tl.arange(0, HALF)
    dd = tl.arange(0, D)
    c = tl.load(cos_ptr + pos * HALF + dh)
    s = tl.load(sin_ptr + pos * HALF + dh)
    cache_off = b.to(tl.int64) * stride_cb + kvh * stride_ch
    kbase = k_ptr + cache_off
    vbase = v_ptr + cache_off
    s_hi = tl.minimum(L, sp * chunk + chunk)
    s_lo = tl.maximum(sp * chunk, (st // BS) * BS)  # blocks that are all left padding are skipped
    smask0, kt1_0, kt2_0, vt_0 = kv_block(kbase, vbase, s_lo, s_hi, st, stride_ct, dh, dd, HALF, BS)
    wait_prior(PDL)

    dtype = k_ptr.dtype.element_ty
    row = b.to(tl.int64) * stride_qkv_row
    # q heads of this group, rotated and rounded to the model dtype
    q_off = row + (kvh * G + g)[:, None] * D + dh[None, :]
    q1 = load_summed(qkv_ptr, q_off, gmask[:, None], qkv_plane, QKV_PARTS, dtype)
    q2 = load_summed(qkv_ptr, q_off + HALF, gmask[:, None], qkv_plane, QKV_PARTS, dtype)
    q1r, q2r = rope_rows(q1.to(tl.float32), q2.to(tl.float32), c[None, :], s[None, :])
    q1r = q1r.to(dtype)
    q2r = q2r.to(dtype)
    # the new k / v
    k1 = load_summed(qkv_ptr, row + (H + kvh) * D + dh, dh < HALF, qkv_plane, QKV_PARTS, dtype)
    k2 = load_summed(qkv_ptr, row + (H + kvh) * D + HALF + dh, dh < HALF, qkv_plane, QKV_PARTS, dtype)
    k1r, k2r = rope_rows(k1.to(tl.float32), k2.to(tl.float32), c, s)
    k1r = k1r.to(dtype)
    k2r = k2r.to(dtype)
    vn = load_summed(qkv_ptr, row + (H + HKV + kvh) * D + dd, dd < D, qkv_plane, QKV_PARTS, dtype)
    last = sp == SPLITS - 1
    if last:  # one writer; no split reads position L from the cache
        tl.store(k_ptr + cache_off + L * stride_ct + dh, k1r)
        tl.store(k_ptr + cache_off + L * stride_ct + HALF + dh, k2r)
        tl.store(v_ptr + cache_off + L * stride_ct + dd, vn)

    qk_scale = sm_scale * 1.4426950408889634  # softmax in base 2
    m_i = tl.full((GP,), -float("inf"), dtype=tl.float32)
    l_i = tl.zeros((GP,), dtype=tl.float32)
    acc = tl.zeros((GP, D), dtype=tl.float32)
    m_i, l_i, acc = attend_block(q1r, q2r, kt1_0, kt2_0, vt_0, smask0[None, :], m_i, l_i, acc, qk_scale)
    for s0 in range(s_lo + BS, s_hi, BS):
        smask, kt1, kt2, vt = kv_block(kbase, vbase, s0, s_hi, st, stride_ct, dh, dd, HALF, BS)
        m_i, l_i, acc = attend_block(q1r, q2r, kt1, kt2, vt, smask[None, :], m_i, l_i, acc, qk_scale)
    # the new token itself (last split only)
    qk_n = (
        tl.sum(q1r.to(tl.float32) * k1r.to(tl.float32)[None, :], axis=1)
        + tl.sum(q2r.to(tl.float32) * k2r.to(tl.float32)[None, :], axis=1)
    ) * qk_scale
    qk_n = tl.where(last, qk_n, -float("inf"))
    m_new = tl.maximum(m_i, qk_n)
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p_n = tl.exp2(qk_n - m_safe)
    l_i = l_i * alpha + p_n
    acc = acc * alpha[:, None] + p_n.to(dtype).to(tl.float32)[:, None] * vn.to(tl.float32)[None, :]
    m_i = m_new
    o_off = b.to(tl.int64) * stride_o_row + (kvh * G + g)[:, None] * D + dd[None, :]
    if SPLITS == 1:
        tl.store(o_ptr + o_off, (acc / l_i[:, None]).to(dtype), mask=gmask[:, None])
    else:
        pair = b * HKV + kvh
        STRIDE: tl.constexpr = GP * (D + 2)  # one split's record: max [GP], sum [GP], values [GP, D]
        rec = ws_ptr + (pair * SPLITS + sp).to(tl.int64) * STRIDE
        tl.store(rec + g, m_i)
        tl.store(rec + GP + g, l_i)
        tl.store(rec + 2 * GP + g[:, None] * D + dd[None, :], acc)
        tl.debug_barrier()  # every thread's part of the record is written before the counter moves
        done = tl.atomic_add(cnt_ptr + pair, 1, sem="acq_rel")
        if done == SPLITS - 1:  # the last split to finish: combine all records in split order
            base = ws_ptr + (pair * SPLITS).to(tl.int64) * STRIDE
            m_all = tl.full((GP,), -float("inf"), dtype=tl.float32)
            for t in range(SPLITS):
                m_all = tl.maximum(m_all, tl.load(base + t * STRIDE + g, cache_modifier=".cg"))
            total = tl.zeros((GP,), dtype=tl.float32)
            vals = tl.zeros((GP, D), dtype=tl.float32)
            for t in range(SPLITS):
                rec_t = base + t * STRIDE
                w = tl.exp2(tl.load(rec_t + g, cache_modifier=".cg") - m_all)  # 0 for an empty split
                total += w * tl.load(rec_t + GP + g, cache_modifier=".cg")
                part = tl.load(rec_t + 2 * GP + g[:, None] * D + dd[None, :], cache_modifier=".cg")
                vals += w[:, None] * part
            tl.store(o_ptr + o_off, (vals / total[:, None]).to(dtype), mask=gmask[:, None])
            tl.atomic_xchg(cnt_ptr + pair, 0)


def attention_splits(
    batch: int, n_kv: int, cache: int, device: torch.device, options: EngineOptions = DEFAULT_OPTIONS
) -> int:
    """Splits of the cache per (sequence, kv head): one per ``options.attn_split_min`` cached positions, up
    to about two programs per SM (fixed by the cache size, so a captured step keeps its grid).

    Short caches stay whole: for a few hundred positions the workspace round trip of the split records
    eats what the extra programs bring."""
    if not options.attn_split or device.type != "cuda":
        return 1
    want = max(1, 2 * num_sms(device) // (batch * n_kv))
    return max(1, min(want, cache // options.attn_split_min))


def decode_attention(
    qkv: torch.Tensor | Partials,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_len: torch.Tensor,
    start: torch.Tensor,
    out: torch.Tensor,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    sm_scale: float,
    splits: int | None = None,
    options: EngineOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """One decode step for all sequences: qkv ``[B, (H+2HKV)*D]`` (or the qkv GEMV's split-K partials) ->
    ``out [B, H*D]``; writes the cache at ``cache_len`` (int32, ``[1]`` for every row or ``[B]``). Blocks
    of up to ``options.attn_block`` positions: a split of that many is one block, all of it loaded before
    the wait on the previous kernel (the loop over later blocks is not software-pipelined: three stages of
    256 positions would not fit an SM's shared memory)."""
    batch = qkv.shape[0]
    group = n_heads // n_kv
    cache = k_cache.shape[2]
    if splits is None:
        splits = attention_splits(batch, n_kv, cache, qkv.device, options)
    gp = max(16, triton.next_power_of_2(group))
    if batch * n_kv > WS_TILES or batch * n_kv * splits * gp * (head_dim + 2) > WS_FLOATS:
        splits = 1  # one split counter per (sequence, kv head); the split records fit the workspace
    chunk = triton.cdiv(triton.cdiv(cache, splits), 64) * 64
    splits = triton.cdiv(cache, chunk)
    block = max(64, min(options.attn_block, triton.next_power_of_2(chunk)))
    # the split records and counters live in the split-K workspace the GEMVs keep (kernels in one stream,
    # each writing only after wait_prior: no two use it at once)
    ws, cnt = workspace(qkv.device) if splits > 1 else (out, out)
    src, stride_row, parts, plane = parts_args(qkv)
    _decode_attention_kernel[(batch, n_kv, splits)](
        src,
        k_cache,
        v_cache,
        cos,
        sin,
        cache_len,
        start,
        out,
        ws,
        cnt,
        0 if cache_len.numel() == 1 else cache_len.stride(0),
        stride_row,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        out.stride(0),
        sm_scale,
        chunk,
        plane,
        H=n_heads,
        HKV=n_kv,
        D=head_dim,
        GP=gp,
        BS=block,
        SPLITS=splits,
        QKV_PARTS=parts,
        num_warps=options.attn_warps if block >= 256 else 4,
        num_stages=1,
        **launch_args(qkv.device, options.pdl),
    )
    return out


@triton.jit
def _greedy_pick_kernel(logits_ptr, tok_ptr, out_ptr, len_ptr, base_ptr, V, stride_l, stride_out,
                        BLOCK: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """One program per sequence: the first index of the largest logit (NaN counts as the largest, as in
    ``torch.argmax``), written as the next input token and into the output row at ``len - base``."""
    wait_prior(PDL)
    b = tl.program_id(0).to(tl.int64)
    best = -float("inf")
    best_i = 0
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        v = tl.load(logits_ptr + b * stride_l + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
        v = tl.where(v != v, float("inf"), v)
        m = tl.max(v, axis=0)
        i = tl.min(tl.where(v == m, offs, V), axis=0)
        take = (m > best) | ((v0 == 0) & (m == best))  # a later block only wins with a larger value
        best_i = tl.where(take, i, best_i)
        best = tl.where(take, m, best)
    tl.store(tok_ptr + b, best_i.to(tl.int64))
    col = tl.load(len_ptr) - tl.load(base_ptr)
    tl.store(out_ptr + b * stride_out + col, best_i.to(tl.int64))


def greedy_pick(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    out: torch.Tensor,
    cache_len: torch.Tensor,
    base: torch.Tensor,
    options: EngineOptions = DEFAULT_OPTIONS,
) -> None:
    """The decode step's greedy tail in one kernel: ``tokens = logits.argmax(-1)`` and
    ``out[:, cache_len - base] = tokens`` (int64 ``tokens [B]``, ``out [B, S]``; int32 device scalars)."""
    batch, vocab = logits.shape
    _greedy_pick_kernel[(batch,)](
        logits, tokens, out, cache_len, base, vocab, logits.stride(0), out.stride(0),
        BLOCK=min(32768, triton.next_power_of_2(vocab)), num_warps=8, **launch_args(logits.device, options.pdl),
    )  # fmt: skip


@triton.jit
def _silu_mul_tile(x_ptr, rows, cols, mask, K):
    g = tl.load(x_ptr + rows + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + rows + K + cols, mask=mask, other=0.0)
    return silu_gate(g, u)


@triton.jit
def token_scales(amax, KIND: tl.constexpr):
    """Per-token ``(q_scale, rf)`` from the (non-outlier) absmax: activations quantize with q_scale
    (``quantize_act``) and the product is multiplied by rf afterwards."""
    if KIND == 1:  # LLM.int8: x * (127 / absmax); a token with no non-outlier mass keeps factor 1
        nonzero = tl.where(amax == 0.0, 1.0, amax)
        # torch's ``127 / t`` is ``t.reciprocal() * 127`` (two roundings): the reference's arithmetic
        q_scale = tl.where(amax == 0.0, 1.0, tl.math.div_rn(nonzero * 0.0 + 1.0, nonzero) * 127.0)
        rf = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, 127.0))
    elif KIND == 2:  # fp8: x / (absmax / 448)
        rf = tl.math.div_rn(amax, 448.0)
        q_scale = tl.where(rf == 0.0, 1.0, rf)
    else:  # SmoothQuant: x / max(absmax / 127, 1e-8)
        q_scale = tl.maximum(tl.math.div_rn(amax, 127.0), 1e-8)
        rf = q_scale
    return q_scale, rf


@triton.jit
def quantize_act(xf, outlier, q_scale, KIND: tl.constexpr):
    """fp32 activations -> their quantized values (fp32): int8 codes, e4m3 values, or (LLM.int8 outlier
    columns) the unrounded ``x * 127 / absmax``."""
    if KIND == 1:
        scaled = xf * q_scale
        q = tl.minimum(tl.maximum(rint(scaled), -127.0), 127.0)
        q = tl.where(outlier, scaled, q)
    elif KIND == 2:
        q = _round_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(xf, q_scale), -448.0), 448.0))
    else:
        q = tl.minimum(tl.maximum(rint(tl.math.div_rn(xf, q_scale)), -127.0), 127.0)
    return q


@triton.jit
def _act_quant_row_kernel(
    x_ptr, xe_ptr, rf_ptr, colmax_ptr, K, stride_x, stride_xe, threshold, KIND: tl.constexpr, ACT: tl.constexpr,
    HAS_COLMAX: tl.constexpr, FOLD: tl.constexpr, CODES: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One token per program, its whole row as one register tile (BK >= K): absmax, factor and quantized
    values from a single round of loads. LLM.int8's outlier columns are the row's own (one token) or, with
    HAS_COLMAX, those whose column maximum over every token (``colmax``, float bits) reaches the threshold.
    FOLD: the stored values are multiplied by the factor ``rf`` (see ``act_quant``). CODES: the codes are
    stored (int8, or e4m3 for fp8; ``act_codes``)."""
    wait_prior(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BK)
    mask = cols < K
    if ACT:
        x = _silu_mul_tile(x_ptr, row * stride_x, cols, mask, K)
    else:
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    ax = tl.abs(xf)
    if HAS_COLMAX:
        outlier = tl.load(colmax_ptr + cols, mask=mask, other=0).to(tl.float32, bitcast=True) >= threshold
    else:
        outlier = ax >= threshold
    if KIND == 1:
        ax = tl.where(outlier, 0.0, ax)
    q_scale, rf = token_scales(tl.max(ax, axis=0), KIND)
    tl.store(rf_ptr + row, rf)
    q = quantize_act(xf, outlier, q_scale, KIND)
    if FOLD and not CODES:
        q = q * rf
    tl.store(xe_ptr + row * stride_xe + cols, q.to(xe_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _col_absmax(x_ptr, m_lo, m_hi, M, cols, cmask, K, stride_x, ACT: tl.constexpr, BM: tl.constexpr,
                BC: tl.constexpr):  # fmt: skip
    """max |x| per column of ``cols`` over tokens ``m_lo .. m_hi`` (in steps of BM)."""
    colmax = tl.zeros((BC,), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask = (offs_m < M)[:, None] & cmask[None, :]
        x = _act_tile(x_ptr, offs_m.to(tl.int64)[:, None] * stride_x, cols[None, :], mask, K, ACT)
        colmax = tl.maximum(colmax, tl.max(tl.abs(x.to(tl.float32)), axis=0))
    return colmax


@triton.jit(do_not_specialize=["M"])
def _act_colmax_kernel(x_ptr, colmax_ptr, M, K, stride_x, RB: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr,
                       BC: tl.constexpr, ATOMIC: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """LLM.int8, one column chunk x one block of RB tokens: the column maxima of |x|, per block
    (``colmax[rb, col]``) or, ATOMIC, merged over every block into ``colmax[col]`` (int32 float bits:
    non-negative floats order like their bits; zero it first)."""
    wait_prior(PDL)
    chunk = tl.program_id(0)
    rb = tl.program_id(1)
    cols = chunk * BC + tl.arange(0, BC)
    cmask = cols < K
    colmax = _col_absmax(
        x_ptr, rb * RB, tl.minimum(M, rb * RB + RB), M, cols, cmask, K, stride_x, ACT, BM, BC
    )
    if ATOMIC:
        tl.atomic_max(colmax_ptr + cols, colmax.to(tl.int32, bitcast=True), mask=cmask)
    else:
        tl.store(colmax_ptr + rb * K + cols, colmax, mask=cmask)


@triton.jit(do_not_specialize=["M", "n_rb"])
def _act_stats_kernel(
    x_ptr, colmax_ptr, flag_ptr, part_ptr, M, K, stride_x, threshold, n_chunks, n_rb,
    KIND: tl.constexpr, ACT: tl.constexpr, RB: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
    BRB: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One column chunk x one block of RB tokens: each token's absmax over the chunk (``part[m, chunk]``),
    without the outlier columns (LLM.int8: |x| >= threshold in any token, from ``colmax``; flagged)."""
    wait_prior(PDL)
    chunk = tl.program_id(0)
    rb = tl.program_id(1)
    cols = chunk * BC + tl.arange(0, BC)
    cmask = cols < K
    outlier = cols < 0
    if KIND == 1:
        if BRB == 0:  # one block of tokens: its own column maxima (no separate pass)
            colmax = _col_absmax(x_ptr, 0, M, M, cols, cmask, K, stride_x, ACT, BM, BC)
        else:
            offs_rb = tl.arange(0, BRB)
            cm = tl.load(colmax_ptr + offs_rb[:, None] * K + cols[None, :],
                         mask=(offs_rb < n_rb)[:, None] & cmask[None, :], other=0.0)  # fmt: skip
            colmax = tl.max(cm, axis=0)
        outlier = colmax >= threshold
        if rb == 0:
            tl.store(flag_ptr + cols, outlier.to(tl.int8), mask=cmask)
    for m0 in range(rb * RB, tl.minimum(M, rb * RB + RB), BM):
        offs_m = m0 + tl.arange(0, BM)
        mask = (offs_m < M)[:, None] & cmask[None, :]
        x = _act_tile(x_ptr, offs_m.to(tl.int64)[:, None] * stride_x, cols[None, :], mask, K, ACT)
        ax = tl.where(outlier[None, :], 0.0, tl.abs(x.to(tl.float32)))
        tl.store(part_ptr + offs_m * n_chunks + chunk, tl.max(ax, axis=1), mask=offs_m < M)


@triton.jit
def _act_apply_kernel(
    x_ptr, xe_ptr, rf_ptr, flag_ptr, part_ptr, K, stride_x, stride_xe, n_chunks,
    KIND: tl.constexpr, ACT: tl.constexpr, FOLD: tl.constexpr, BC: tl.constexpr, BCH: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """One token x one column chunk: the token scale from its chunk maxima, then the quantized values
    (int8 codes, e4m3 values, LLM.int8 outlier columns unrounded) in the model dtype; chunk 0 stores
    the factor ``rf`` to apply after the matmul."""
    wait_prior(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_ch = tl.arange(0, BCH)
    amax = tl.max(tl.load(part_ptr + row * n_chunks + offs_ch, mask=offs_ch < n_chunks, other=0.0), axis=0)
    q_scale, rf = token_scales(amax, KIND)
    if chunk == 0:
        tl.store(rf_ptr + row, rf)
    cols = chunk * BC + tl.arange(0, BC)
    cmask = cols < K
    x = _act_tile(x_ptr, row.to(tl.int64) * stride_x, cols, cmask, K, ACT)
    if KIND == 1:
        outlier = tl.load(flag_ptr + cols, mask=cmask, other=0) != 0
    else:
        outlier = cols < 0
    q = quantize_act(x.to(tl.float32), outlier, q_scale, KIND)
    if FOLD:
        q = q * rf
    tl.store(xe_ptr + row.to(tl.int64) * stride_xe + cols, q.to(xe_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _act_tile(x_ptr, rows, cols, mask, K, ACT: tl.constexpr):
    """Activations at (rows, cols): silu(gate) * up of a gate/up output when ACT, as HF rounds it."""
    if ACT:
        return _silu_mul_tile(x_ptr, rows, cols, mask, K)
    return tl.load(x_ptr + rows + cols, mask=mask, other=0.0)


@triton.jit
def _round_e4m3(v):
    """Round fp32 ``|v| <= 448`` to the nearest float8 e4m3fn value (ties to even), as fp32: the grid
    spacing is 2**(max(e, -6) - 3) for binary exponent e (subnormals below 2**-6)."""
    e = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6) - 3
    ulp = ((e + 127) << 23).to(tl.float32, bitcast=True)
    per_ulp = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 1 / ulp: the product is exact
    return rint(v * per_ulp) * ulp


def _act_pdl(x: torch.Tensor, options: EngineOptions) -> dict:
    """Launch arguments of activation quantization: prompt sizes (over 64 tokens) launch without PDL
    unless ``options.act_prompt_pdl``."""
    if x.shape[0] > 64 and not options.act_prompt_pdl:
        return {"PDL": False}
    return launch_args(x.device, options.pdl)


def _merged_colmax(
    x: torch.Tensor, k: int, act_silu_mul: bool, options: EngineOptions, pdl: dict
) -> torch.Tensor:
    """LLM.int8's column maxima of |x| over every token, ``[K]`` int32 float bits (one atomic pass)."""
    m = x.shape[0]
    chunk, rows, load_rows, _ = options.act_tiles_outlier
    colmax = torch.zeros((k,), device=x.device, dtype=torch.int32)
    _act_colmax_kernel[(triton.cdiv(k, chunk), triton.cdiv(m, rows))](
        x, colmax, m, k, x.stride(0), RB=rows, ACT=act_silu_mul, BM=min(load_rows, triton.next_power_of_2(m)),
        BC=chunk, ATOMIC=True, num_warps=8, **pdl,
    )  # fmt: skip
    return colmax


def _quantize_rows(
    x: torch.Tensor, out: torch.Tensor, kind: int, thr: float, act_silu_mul: bool, k: int,
    colmax: torch.Tensor | None, pdl: dict, fold: bool = False,
) -> torch.Tensor:  # fmt: skip
    """One whole-row program per token into ``out`` (model dtype, or 8-bit codes); the factors ``[M]``.
    ``colmax``: LLM.int8's merged column maxima (``_merged_colmax``), else each row's own outliers."""
    m = x.shape[0]
    rf = torch.empty((m,), device=x.device, dtype=torch.float32)
    row = triton.next_power_of_2(k)
    _act_quant_row_kernel[(m,)](
        x, out, rf, colmax if colmax is not None else rf, k, x.stride(0), out.stride(0), thr, KIND=kind,
        ACT=act_silu_mul, HAS_COLMAX=colmax is not None, FOLD=fold, CODES=out.dtype in _CODE_DTYPES, BK=row,
        num_warps=max(4, min(32, row // 1024)), **pdl,
    )  # fmt: skip
    return rf


def _threshold(threshold: float) -> float:
    return float(threshold) if threshold > 0 else float("inf")  # 0 = no outlier decomposition


def act_quant(
    x: torch.Tensor,
    kind: int,
    threshold: float,
    act_silu_mul: bool,
    k: int,
    options: EngineOptions = DEFAULT_OPTIONS,
    fold: bool = False,
    outliers: OutlierColumns | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized activations ``[M, K]`` (model dtype) and per-token factors ``[M]`` fp32, as
    ``kernels.act_quant_torch`` computes them; ``fold``: the activations come multiplied by their factor
    (in fp32, then rounded to the model dtype), for a product that applies no factor afterwards;
    ``outliers``: LLM.int8's outlier columns of x as its producer recorded them (``outlier_columns``), in
    place of the column-maxima pass.

    One token: one program holding the whole row. More: (LLM.int8 over more than one block of tokens:
    column maxima per block, then) each token's maximum per chunk and outlier flags, then one program per
    (token, chunk); every step is parallel over column chunks and blocks of tokens. Program sizes:
    ``options.act_tiles_*``. From ``options.act_rows_min_m`` tokens (above 64), one whole-row program per
    token instead (LLM.int8: after one column-maxima pass merged over every token): one read of the
    activations fewer."""
    m = x.shape[0]
    pdl = _act_pdl(x, options)
    xe = torch.empty((m, k), device=x.device, dtype=x.dtype)
    thr = _threshold(threshold)
    if _rows_mode(m, k, options):
        colmax = None
        if m > 1 and kind == ACT_LLM_INT8 and thr != float("inf"):  # outlier columns over every token first
            if outliers is not None and not act_silu_mul:
                colmax = outliers.colmax
            else:
                colmax = _merged_colmax(x, k, act_silu_mul, options, pdl)
        return xe, _quantize_rows(x, xe, kind, thr, act_silu_mul, k, colmax, pdl, fold)
    rf = torch.empty((m,), device=x.device, dtype=torch.float32)
    # statistics programs: one column chunk x a block of tokens each; prompts take smaller ones so that
    # the passes spread over the SMs (128 tokens x 4096 columns: 8 programs of 1024 x 64, 128 of 256 x 16;
    # LLM.int8: 64 of 64 columns x every token, loaded at once).
    if m <= 64:
        tiles = options.act_tiles_decode
    else:
        tiles = options.act_tiles_outlier if kind == ACT_LLM_INT8 else options.act_tiles_prompt
    chunk, rows, load_rows, apply_chunk = tiles
    n_chunks, n_rb = triton.cdiv(k, chunk), triton.cdiv(m, rows)
    bm = min(load_rows, triton.next_power_of_2(m))
    flags = torch.empty((k,), device=x.device, dtype=torch.int8)
    part = torch.empty((m, n_chunks), device=x.device, dtype=torch.float32)
    colmax, brb = flags, 0  # BRB = 0: no column-maxima pass (one block of tokens, or no outliers to find)
    if kind == ACT_LLM_INT8 and n_rb > 1:
        brb = max(2, triton.next_power_of_2(n_rb))
        colmax = torch.empty((n_rb, k), device=x.device, dtype=torch.float32)
        _act_colmax_kernel[(n_chunks, n_rb)](
            x, colmax, m, k, x.stride(0), RB=rows, ACT=act_silu_mul, BM=bm, BC=chunk, ATOMIC=False, num_warps=8,
            **pdl,
        )  # fmt: skip
    _act_stats_kernel[(n_chunks, n_rb)](
        x, colmax, flags, part, m, k, x.stride(0), thr, n_chunks, n_rb,
        KIND=kind, ACT=act_silu_mul, RB=rows, BM=bm, BC=chunk, BRB=brb,
        num_warps=8, **pdl,
    )  # fmt: skip
    _act_apply_kernel[(m, triton.cdiv(k, apply_chunk))](
        x, xe, rf, flags, part, k, x.stride(0), xe.stride(0), n_chunks,
        KIND=kind, ACT=act_silu_mul, FOLD=fold, BC=apply_chunk, BCH=max(2, triton.next_power_of_2(n_chunks)), num_warps=4, **pdl,
    )  # fmt: skip
    return xe, rf


def act_codes(
    x: torch.Tensor,
    layout: WQLayout,
    act_silu_mul: bool = False,
    options: EngineOptions = DEFAULT_OPTIONS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation codes ``[M, K]`` of ``layout``'s input (``[M, 2K]`` gate/up when ``act_silu_mul``) for an
    8-bit x 8-bit product, and the per-token factors ``[M]`` fp32: int8 codes for LLM.int8 without outlier
    decomposition and SmoothQuant, float8_e4m3fn for fp8. The same arithmetic as ``act_quant`` (one
    whole-row program per token, K up to ``ROW_TILE_MAX``)."""
    kind, k = layout.act_quant, layout.in_features
    if kind not in CODE_DTYPE_OF_ACT:
        raise ValueError(f"act_codes quantizes LLM.int8, SmoothQuant or fp8 activations, not kind {kind}")
    if triton.next_power_of_2(k) > ROW_TILE_MAX:
        raise ValueError(f"act_codes holds a whole row in one program: K = {k} is over {ROW_TILE_MAX}")
    thr = _threshold(layout.threshold)
    if kind == ACT_LLM_INT8 and thr != float("inf"):
        raise ValueError("act_codes quantizes LLM.int8 activations without outlier decomposition only")
    codes = torch.empty((x.shape[0], k), device=x.device, dtype=CODE_DTYPE_OF_ACT[kind])
    return codes, _quantize_rows(x, codes, kind, thr, act_silu_mul, k, None, _act_pdl(x, options))
