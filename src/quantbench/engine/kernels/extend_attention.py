"""Attention of an extend forward (scoring, prefix and generation batches) in Triton: the new tokens' queries,
rotated from the fused q/k/v product in the kernel, attend to their past's real keys (a shared prefix,
picked per row by index, read where it is stored) and causally to their own keys; the output lands in the
``[B*T, H*D]`` layout the o-projection reads. What the reference (``ops.extend_attention_ref``) builds
with a gather, a concatenation, a materialised mask and a transposed copy, this reads in place.

Row independence: a query row walks its keys in blocks of a fixed size from position 0, and a block (or
part of one) it may not see adds exact zeros, so a row's output does not depend on the other rows of the
batch, on how far the batch is padded, or on the past's width (issue "A verdict you can trust").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantbench.engine.kernels.fused import OutlierColumns, record_args, record_tile, rope_kv
from quantbench.engine.kernels.triton_common import attend_block, kv_block, rope_rows

QUERY_BLOCK = 64  # fixed (not chosen per batch): the same tiles, the same arithmetic for a row in any batch


@triton.jit(do_not_specialize=["T", "P", "stride_valid"])
def _extend_attention_kernel(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, pvalid_ptr, index_ptr, o_ptr,
    T, P, stride_qkv_row, stride_kb, stride_kh, stride_kt, stride_pb, stride_ph, stride_pt, stride_valid,
    stride_o_row, qk_scale, cm_ptr, threshold,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_PAST: tl.constexpr, COLMAX: tl.constexpr,
):  # fmt: skip
    """One program per (row b, query head h, block of BM new tokens). COLMAX: record the output's LLM.int8
    outlier columns for the o projection (``fused.record_tile``)."""
    bh = tl.program_id(0)  # heads of one row side by side: the programs sharing a kv head run together
    tb = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // (H // HKV)
    HALF: tl.constexpr = D // 2
    dh = tl.arange(0, HALF)
    dd = tl.arange(0, D)
    offs_m = tb * BM + tl.arange(0, BM)
    mmask = offs_m < T
    rows = b.to(tl.int64) * T + offs_m
    dtype = k_ptr.dtype.element_ty

    # the block's queries, rotated in fp32 and rounded to the model dtype (as the reference does)
    pos = tl.load(pos_ptr + rows, mask=mmask, other=0)
    c = tl.load(cos_ptr + pos[:, None] * HALF + dh[None, :])
    s = tl.load(sin_ptr + pos[:, None] * HALF + dh[None, :])
    q_off = rows[:, None] * stride_qkv_row + h * D + dh[None, :]
    q1 = tl.load(qkv_ptr + q_off, mask=mmask[:, None], other=0.0)
    q2 = tl.load(qkv_ptr + q_off + HALF, mask=mmask[:, None], other=0.0)
    q1r, q2r = rope_rows(q1.to(tl.float32), q2.to(tl.float32), c, s)
    q1r = q1r.to(dtype)
    q2r = q2r.to(dtype)

    m_i = tl.full((BM,), -float("inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, D), dtype=tl.float32)
    if HAS_PAST:  # the past's real keys, read where the past is stored
        src = tl.load(index_ptr + b).to(tl.int64)
        kbase = pk_ptr + src * stride_pb + kvh * stride_ph
        vbase = pv_ptr + src * stride_pb + kvh * stride_ph
        for s0 in range(0, P, BN):
            nmask, kt1, kt2, vt = kv_block(kbase, vbase, s0, P, 0, stride_pt, dh, dd, HALF, BN)
            offs_n = s0 + tl.arange(0, BN)
            real = tl.load(pvalid_ptr + src * stride_valid + offs_n, mask=nmask, other=0) != 0
            keep = real[None, :] & mmask[:, None]
            m_i, l_i, acc = attend_block(q1r, q2r, kt1, kt2, vt, keep, m_i, l_i, acc, qk_scale)
    # the new tokens' own keys, causally
    kbase = k_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
    vbase = v_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
    for s0 in range(0, tl.minimum(tb * BM + BM, T), BN):
        nmask, kt1, kt2, vt = kv_block(kbase, vbase, s0, T, 0, stride_kt, dh, dd, HALF, BN)
        offs_n = s0 + tl.arange(0, BN)
        keep = (offs_n[None, :] <= offs_m[:, None]) & nmask[None, :]
        m_i, l_i, acc = attend_block(q1r, q2r, kt1, kt2, vt, keep, m_i, l_i, acc, qk_scale)
    out = (acc / l_i[:, None]).to(dtype)
    tl.store(o_ptr + rows[:, None] * stride_o_row + h * D + dd[None, :], out, mask=mmask[:, None])
    if COLMAX:
        record_tile(cm_ptr, mmask, h * D + dd, dd < D, out, threshold)


def key_block(head_dim: int) -> int:
    """Keys per block: fixed per head size (shared memory), never per batch."""
    return 64 if head_dim <= 128 else 32


def extend_attention(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    past_k: torch.Tensor | None,
    past_v: torch.Tensor | None,
    past_valid: torch.Tensor | None,
    index: torch.Tensor | None,
    mask: torch.Tensor | None,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    sm_scale: float,
    with_past: bool = False,
    outliers: OutlierColumns | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ops.extend_attention_ref``'s contract on the GPU (``outliers``: also record the output's LLM.int8
    outlier columns there, ``fused.outlier_columns``): the fused product ``qkv [B*T, (H + 2 HKV) D]`` of
    tokens at ``positions [B, T]`` -> (attention output ``[B*T, H*D]``, their own rotated keys and values
    ``[B, HKV, T, D]``, or with ``with_past`` and a past each row's past keys and values followed by its
    own). Row b attends to the real keys (``past_valid [N, P]``) of past sequence
    ``index[b]`` (default b) of ``past_k / past_v [N, HKV, P, D]``, then causally to its own tokens.
    ``mask`` (the reference's) is not used."""
    del mask
    b, t = positions.shape
    positions = positions.contiguous()
    k = torch.empty((b, n_kv, t, head_dim), dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    rope_kv(qkv, k, v, cos, sin, positions, n_heads, n_kv, head_dim)
    out = torch.empty((b * t, n_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    has_past = past_k is not None
    rows_past = index
    if has_past:
        if index is None:
            index = torch.arange(b, device=qkv.device)
        valid = past_valid.contiguous().view(torch.uint8)
        p = past_k.shape[2]
        pk, pv, pstrides = past_k, past_v, past_k.stride()[:3]
        if past_v.stride() != past_k.stride() or past_k.stride(3) != 1:
            raise ValueError("past keys and values must share one layout, rows of head_dim contiguous")
    else:
        index, valid, p = positions, positions, 0  # placeholders, never read
        pk, pv, pstrides = k, v, (0, 0, 0)
    block_n = key_block(head_dim)
    records, switches = record_args(outliers, out)
    _extend_attention_kernel[(b * n_heads, triton.cdiv(t, QUERY_BLOCK))](
        qkv,
        positions,
        cos,
        sin,
        k,
        v,
        pk,
        pv,
        valid,
        index,
        out,
        t,
        p,
        qkv.stride(0),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        *pstrides,
        valid.stride(0) if has_past else 0,
        out.stride(0),
        sm_scale * 1.4426950408889634,  # softmax in base 2
        *records,
        H=n_heads,
        HKV=n_kv,
        D=head_dim,
        BM=QUERY_BLOCK,
        BN=block_n,
        HAS_PAST=has_past,
        **switches,
        num_warps=4,
        num_stages=2,
    )
    if with_past and has_past:  # the past was read in place above; a generation step keeps its own copy
        k = torch.cat([past_k if rows_past is None else past_k[rows_past], k], dim=2)
        v = torch.cat([past_v if rows_past is None else past_v[rows_past], v], dim=2)
    return out, k, v
