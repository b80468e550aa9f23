"""The engine's fused ops, each with a pure-torch reference (CPU, and the check for the Triton path)
and a Triton implementation used on CUDA. Signatures match ``kernels/fused.py``."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions

# On CUDA, SDPA's cuDNN backend builds an execution plan for every new shape, milliseconds of host time
# each; prompt and scoring batches rarely repeat a shape, so the engine names the backends it runs.
_CAUSAL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_MASKED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the engine's backends on CUDA (torch's choice on CPU)."""
    backends = _MASKED_BACKENDS if attn_mask is not None else _CAUSAL_BACKENDS
    with sdpa_kernel(backends) if q.is_cuda else contextlib.nullcontext():
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )


def add_rmsnorm_ref(
    h: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, out: torch.Tensor
) -> torch.Tensor:
    if residual is not None:
        h.copy_((h.float() + residual.float()).to(h.dtype))
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    out.copy_((normed.float() * weight.float()).to(h.dtype))
    return out


def silu_mul_ref(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    inter = gate_up.shape[-1] // 2
    res = F.silu(gate_up[..., :inter]) * gate_up[..., inter:]
    if out is None:
        return res
    return out.copy_(res)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope_cache_prefill_ref(
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
    b, _, t, d = q_out.shape
    x = qkv.view(b, t, n_heads + 2 * n_kv, d)
    pos = (torch.arange(t, device=qkv.device)[None, :] - start[:, None].long()).clamp_min(0)  # [B, T]
    c, s = cos[pos][:, :, None, :], sin[pos][:, :, None, :]
    q = _rope(x[:, :, :n_heads], c, s)
    k = _rope(x[:, :, n_heads : n_heads + n_kv], c, s)
    v = x[:, :, n_heads + n_kv :]
    q_out.copy_(q.transpose(1, 2))
    k_cache[:, :, :t].copy_(k.transpose(1, 2))
    v_cache[:, :, :t].copy_(v.transpose(1, 2))


def decode_attention_ref(
    qkv: torch.Tensor,
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
) -> torch.Tensor:
    b = qkv.shape[0]
    d = head_dim
    lengths = cache_len.long().expand(b)  # one shared index ([1]) or one per row ([B])
    length = int(lengths.max())
    x = qkv.view(b, n_heads + 2 * n_kv, d)
    pos = (lengths - start.long()).clamp_min(0)  # [B]
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    q = _rope(x[:, :n_heads], c, s)
    rows = torch.arange(b, device=qkv.device)
    k_cache[rows, :, lengths] = _rope(x[:, n_heads : n_heads + n_kv], c, s)
    v_cache[rows, :, lengths] = x[:, n_heads + n_kv :]
    keys = k_cache[:, :, : length + 1].float()
    vals = v_cache[:, :, : length + 1].float()
    group = n_heads // n_kv
    qg = q.float().view(b, n_kv, group, d)
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, keys) * sm_scale
    span = torch.arange(length + 1, device=qkv.device)[None, :]
    valid = (span >= start[:, None].long()) & (span <= lengths[:, None])  # [B, S]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    # positions past a row's own length hold whatever the cache had there (never written: any bits)
    vals = vals.masked_fill(~valid[:, None, :, None], 0.0)
    probs = torch.softmax(scores, dim=-1)
    res = torch.einsum("bhgs,bhsd->bhgd", probs, vals)
    out.copy_(res.reshape(b, n_heads * d).to(out.dtype))
    return out


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor | None, sm_scale: float
) -> torch.Tensor:
    """SDPA over the prompt: ``q [B, H, T, D]``, ``k/v [B, HKV, T, D]``; causal, left padding masked."""
    group = q.shape[1] // k.shape[1]
    if start is None:  # flash attention reads the shared k/v heads itself (no expanded copies)
        return sdpa(q, k, v, is_causal=True, scale=sm_scale, enable_gqa=group > 1)
    if group > 1:  # with a mask, the backends that take one may not take GQA: expand k / v
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    t = q.shape[2]
    idx = torch.arange(t, device=q.device)
    causal = idx[None, :] <= idx[:, None]  # [T(q), T(k)]
    keep = causal[None] & (idx[None, None, :] >= start[:, None, None].long())
    keep = keep | torch.eye(t, dtype=torch.bool, device=q.device)[None]  # pad rows see themselves
    return sdpa(q, k, v, attn_mask=keep[:, None], scale=sm_scale)


def rope_qkv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_heads: int,
    n_kv: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused product ``qkv [B*T, (H + 2 HKV) D]`` into ``q [B, H, T, D]``, ``k``, ``v [B, HKV, T, D]``
    with RoPE applied to q and k at the explicit ``positions [B, T]``."""
    b, t = positions.shape
    x = qkv.view(b, t, n_heads + 2 * n_kv, head_dim)
    c, s = cos[positions][:, :, None, :], sin[positions][:, :, None, :]
    q = _rope(x[:, :, :n_heads], c, s).transpose(1, 2)
    k = _rope(x[:, :, n_heads : n_heads + n_kv], c, s).transpose(1, 2)
    return q, k, x[:, :, n_heads + n_kv :].transpose(1, 2)


def extend_mask(
    past_valid: torch.Tensor | None, t: int, group: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """The additive attention mask (0 where a query sees a key, -inf elsewhere, in ``dtype``) of ``t`` new
    tokens after a past whose real keys ``past_valid [B, P]`` marks (None: no past, plain causal attention):
    ``[B, 1, group * t, P + t]`` for :func:`extend_attention_ref`, the rows of one KV head's ``group`` query
    heads stacked. Rows are right-padded, so a real query never sees a pad of its own row, and a pad query
    sees at least itself. Built once per forward: SDPA would turn a boolean mask into this in every layer.
    The Triton path (``kernels/extend_attention.py``) needs none."""
    if past_valid is None:
        return None
    b, p = past_valid.shape
    idx = torch.arange(t, device=past_valid.device)
    own = (idx[None, :] <= idx[:, None])[None].expand(b, t, t)
    keep = torch.cat([past_valid[:, None, :].expand(b, t, p), own], dim=-1)  # [B, T, P + T]
    additive = torch.zeros((b, t, p + t), dtype=dtype, device=past_valid.device).masked_fill_(
        ~keep, float("-inf")
    )
    return additive[:, None].expand(b, group, t, p + t).reshape(b, 1, group * t, p + t)


def extend_attention_ref(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of ``T`` new tokens: the fused product ``qkv [B*T, (H + 2 HKV) D]`` at ``positions [B, T]`` ->
    (the output ``[B*T, H*D]``, the tokens' own rotated keys and values ``[B, HKV, T, D]``: views into the
    product here, own storage in the Triton kernel; with ``with_past`` and a past, each row's past keys and
    values followed by its own, ``[B, HKV, P + T, D]``, what a generation step keeps). Row b attends to the
    real keys of past sequence
    ``index[b]`` (default b) of ``past_k / past_v [N, HKV, P, D]`` (``past_valid [N, P]`` marks them;
    :func:`extend_mask`'s ``mask`` says the same per row) and causally to its own tokens. SDPA with the
    query heads that share a KV head stacked along the query axis (``[B, HKV, G * T, D]``), so the mask is
    repeated instead of the keys and values."""
    b, t = positions.shape
    q, k, v = rope_qkv(qkv, positions, cos, sin, n_heads, n_kv, head_dim)
    if past_k is None:
        attn = sdpa(q, k, v, is_causal=True, scale=sm_scale, enable_gqa=n_heads > n_kv)
    else:
        pk, pv = (past_k, past_v) if index is None else (past_k[index], past_v[index])
        keys, values = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        q = q.reshape(b, n_kv, (n_heads // n_kv) * t, head_dim)
        # reshape: the memory-efficient kernel returns its output in a transposed layout
        attn = sdpa(q, keys, values, attn_mask=mask, scale=sm_scale).reshape(b, n_heads, t, head_dim)
        if with_past:
            k, v = keys, values
    return attn.transpose(1, 2).reshape(b * t, n_heads * head_dim), k, v


class Ops:
    """The op table the engine calls: Triton kernels (launched as ``options`` say) when ``use_triton``, else
    the references. ``extend_mask``: whether ``extend_attention`` takes :func:`extend_mask`'s mask."""

    def __init__(self, use_triton: bool, options: EngineOptions = DEFAULT_OPTIONS) -> None:
        self.use_triton = use_triton
        if use_triton:
            from quantbench.engine.kernels import fused
            from quantbench.engine.kernels.extend_attention import extend_attention

            self.add_rmsnorm = functools.partial(fused.add_rmsnorm, options=options)
            self.silu_mul = functools.partial(fused.silu_mul, options=options)
            self.rope_cache_prefill = fused.rope_cache_prefill
            self.decode_attention = functools.partial(fused.decode_attention, options=options)
            self.extend_attention = extend_attention if options.extend_triton else extend_attention_ref
        else:
            self.add_rmsnorm = add_rmsnorm_ref
            self.silu_mul = silu_mul_ref
            self.rope_cache_prefill = rope_cache_prefill_ref
            self.decode_attention = decode_attention_ref
            self.extend_attention = extend_attention_ref
        self.prefill_attention = prefill_attention
        self.extend_mask = self.extend_attention is extend_attention_ref
