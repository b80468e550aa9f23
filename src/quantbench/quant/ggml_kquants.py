"""llama.cpp's k-quants q4_K, q5_K and q6_K: the exact bytes of ``quantize_row_q{4,5,6}_K_ref``.

These are the quantizers ``llama-quantize`` runs when no importance matrix is given. Each function
takes a float weight ``[out, in]`` (``in`` a multiple of 256) and returns ``uint8 [out, in/256 *
type_size]``: row by row the ggml blocks, the same bytes as a GGUF tensor of that type.

To be bit-exact the float32 arithmetic follows the C code operation by operation: sums over a block
accumulate element by element (a Python loop over the 16/32 positions, vectorised over all blocks),
``nearest_int`` is the magic-number trick, halves are rounded to nearest even. Two things torch does
differently from C are avoided: ``scalar / tensor`` is a reciprocal times the scalar (not one
division) and float32 ``sqrt`` is not correctly rounded on CPU, so divisions are tensor / tensor and
``sqrtf`` is done in float64. The reference is ggml-base compiled without FMA (x86-64 baseline, as
pip wheels and distro builds are); a build whose compiler contracts ``a*b + c`` into FMA (clang's
default on Apple/ARM) can differ in rare blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType

from quantbench.quant.ggml import ggml_method, register_format

QK_K = 256
TYPE_SIZE = {"q4_K": 144, "q5_K": 176, "q6_K": 210}

_MAGIC = 12582912.0  # 1.5 * 2**23: adding it rounds a float32 to an integer in the low mantissa bits
_GROUP_MAX_EPS = float(np.float32(1e-15))


def _f32(value: float) -> float:
    """A Python float holding exactly the float32 that C gets for ``value``."""
    return float(np.float32(value))


def _nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even, and the same garbage as C for |x| > 2**22."""
    bits = (x + _MAGIC).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _div(num: float | torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # A real elementwise division: torch turns `scalar / tensor` into reciprocal * scalar.
    if not isinstance(num, torch.Tensor):
        num = torch.full_like(den, num)
    return num / den


def _sqrtf(x: torch.Tensor) -> torch.Tensor:
    # float64 sqrt rounded to float32 is the correctly rounded sqrtf (53 >= 2*24 + 2).
    return x.double().sqrt().float()


def _seqsum(terms: torch.Tensor) -> torch.Tensor:
    """``float s = 0; for i: s += terms[i]`` along dim 0, in C's order."""
    acc = torch.zeros_like(terms[0])
    for i in range(terms.shape[0]):
        acc = acc + terms[i]
    return acc


def _to_blocks(weight: torch.Tensor) -> torch.Tensor:
    """Rows of 256 float32 weights (the shape was checked by :func:`_by_rows`)."""
    return weight.detach().to(device="cpu", dtype=torch.float32).reshape(-1, QK_K)


# Weights quantized per step: blocks are independent, and a step's [positions, sub-blocks] working set that
# stays in the CPU's cache makes the elementwise passes several times faster than one pass over a tensor.
STEP_WEIGHTS = 1 << 18


def _by_rows(
    quantize_rows: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor, step_weights: int
) -> torch.Tensor:
    """``quantize_rows`` over slices of whole rows of about ``step_weights`` weights each, concatenated;
    ``weight`` must be ``[out, in]`` with ``in`` a multiple of 256."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if weight.shape[1] % QK_K:
        raise ValueError(f"row length {weight.shape[1]} is not a multiple of {QK_K}")
    rows = max(1, step_weights // max(1, weight.shape[1]))
    if weight.shape[0] <= rows:
        return quantize_rows(weight)
    return torch.cat([quantize_rows(weight[r : r + rows]) for r in range(0, weight.shape[0], rows)])


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants (use_mad false) on position-major ``x, w [n, M]``: (scale, the_min, L)."""
    n = x.shape[0]
    mn = x.amin(0)
    mx = x.amax(0)
    sum_w = w[0].clone()
    sum_x = sum_w * x[0]
    wx = w * x
    for i in range(1, n):
        sum_w = sum_w + w[i]
        sum_x = sum_x + wx[i]
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn  # C returns early: L = 0, scale 0, the_min = -min
    flat_min = mn

    iscale = _div(float(nmax), mx - mn)
    scale = _div(1.0, iscale)
    big_l = _nearest_int(iscale * (x - mn)).clamp(0, nmax)
    diff = scale * big_l.float() + mn - x
    best_error = _seqsum(w * (diff * diff))

    for step in range(nstep + 1):
        num = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)
        iscale = _div(float(num), mx - mn)  # mn is the best min so far, as in C
        laux = _nearest_int(iscale * (x - mn)).clamp(0, nmax)
        lf = laux.float()
        wl = w * lf
        sum_l = _seqsum(wl)
        sum_l2 = _seqsum(wl * lf)
        sum_xl = _seqsum(wl * x)
        big_d = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / big_d
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / big_d
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        diff = this_scale * lf + this_min - x
        cur_error = _seqsum(w * (diff * diff))
        better = (big_d > 0) & (cur_error < best_error)
        big_l = torch.where(better, laux, big_l)
        best_error = torch.where(better, cur_error, best_error)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)

    zero = torch.zeros_like(scale)
    scale = torch.where(flat, zero, scale)
    big_l = torch.where(flat, torch.zeros_like(big_l), big_l)
    mn = torch.where(flat, flat_min, mn)
    return scale, -mn, big_l


def _quantize_qkx(weight: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The part of quantize_row_q4_K_ref / q5_K_ref they share: (d, dmin, ls, lm, L [N, 256])."""
    blocks = _to_blocks(weight)
    nblk = blocks.shape[0]
    xs = blocks.reshape(nblk * 8, 32).T.contiguous()  # [32, M]: one column per 32-value sub-block
    sum_x2 = _seqsum(xs * xs)
    av_x = _sqrtf(sum_x2 / 32.0)
    weights = av_x + xs.abs()
    scales, mins, big_l = _make_qkx2_quants(xs, weights, nmax, rmin, rdelta, nstep)
    scales = scales.reshape(nblk, 8)
    mins = mins.reshape(nblk, 8)
    big_l = big_l.T.reshape(nblk, 8, 32)

    zero = torch.zeros(nblk)
    # C starts from 0 and keeps a value only if it is greater: -0.0 stays +0.0 (torch.maximum's choice
    # between equal zeros differs between its vectorized and scalar loops, so it is not used)
    top_scale, top_min = scales.amax(1), mins.amax(1)
    max_scale = torch.where(top_scale > 0, top_scale, zero)
    max_min = torch.where(top_min > 0, top_min, zero)
    inv_scale = torch.where(max_scale > 0, _div(63.0, max_scale), zero)
    inv_min = torch.where(max_min > 0, _div(63.0, max_min), zero)
    # `uint8_t ls = nearest_int(...)` keeps the low byte, then MIN(63, ls).
    ls = (_nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp(max=63)
    lm = (_nearest_int(inv_min[:, None] * mins) & 0xFF).clamp(max=63)
    d16 = _div(max_scale, torch.full_like(max_scale, 63.0)).to(torch.float16)
    dmin16 = _div(max_min, torch.full_like(max_min, 63.0)).to(torch.float16)

    # Requantize each sub-block with the stored 6-bit scale/min; a zero scale keeps the first L.
    d = (d16.float()[:, None] * ls.float())[:, :, None]
    dm = (dmin16.float()[:, None] * lm.float())[:, :, None]
    xb = blocks.reshape(nblk, 8, 32)
    requant = _nearest_int((xb + dm) / d).clamp(0, nmax)
    big_l = torch.where(d != 0, requant, big_l)
    return d16, dmin16, ls, lm, big_l.reshape(nblk, QK_K)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """The 12 scale bytes of q4_K/q5_K (the inverse of get_scale_min_k4)."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([lo, mid, hi], dim=1).to(torch.uint8)


def _quantize_q4_k_rows(weight: torch.Tensor) -> torch.Tensor:
    """One slice of rows (see the public function of the same type)."""
    rows = weight.shape[0]
    d16, dmin16, ls, lm, big_l = _quantize_qkx(weight, 15, -1.0, 0.1, 20)
    q = big_l.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128).to(torch.uint8)
    out = torch.cat([_fp16_bytes(d16), _fp16_bytes(dmin16), _pack_scales_k4(ls, lm), qs], dim=1)
    return out.reshape(rows, -1)


def _quantize_q5_k_rows(weight: torch.Tensor) -> torch.Tensor:
    """One slice of rows (see the public function of the same type)."""
    rows = weight.shape[0]
    d16, dmin16, ls, lm, big_l = _quantize_qkx(weight, 31, -0.5, 0.1, 15)
    q = big_l.reshape(-1, 4, 2, 32)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    # bit 2k of qh[j] is the 5th bit of value 64k + j, bit 2k+1 that of value 64k + 32 + j
    high = (q >> 4).reshape(-1, 8, 32)
    shifts = torch.arange(8, dtype=high.dtype).reshape(1, 8, 1)
    qh = (high << shifts).sum(1)
    out = torch.cat(
        [
            _fp16_bytes(d16),
            _fp16_bytes(dmin16),
            _pack_scales_k4(ls, lm),
            qh.to(torch.uint8),
            qs.to(torch.uint8),
        ],
        dim=1,
    )
    return out.reshape(rows, -1)


def quantize_q4_k(weight: torch.Tensor, step_weights: int = STEP_WEIGHTS) -> torch.Tensor:
    """``weight [out, in]`` -> ``uint8 [out, in/256*144]``, the bytes of ggml's quantize_row_q4_K_ref."""
    return _by_rows(_quantize_q4_k_rows, weight, step_weights)


def quantize_q5_k(weight: torch.Tensor, step_weights: int = STEP_WEIGHTS) -> torch.Tensor:
    """``weight [out, in]`` -> ``uint8 [out, in/256*176]``, the bytes of ggml's quantize_row_q5_K_ref."""
    return _by_rows(_quantize_q5_k_rows, weight, step_weights)


def _make_qx_quants_rmse1(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) on position-major ``x [n, M]``: (scale, L)."""
    ax = x.abs()
    first = ax.argmax(0, keepdim=True)  # C keeps the first of equal maxima (strict >)
    amax = ax.gather(0, first)[0]
    mx = x.gather(0, first)[0]
    zero_group = amax < _GROUP_MAX_EPS
    w = x * x
    wx = w * x

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lq = _nearest_int(iscale * x).clamp(-nmax, nmax - 1)
        lf = lq.float()
        return lq, _seqsum(wx * lf), _seqsum(w * lf * lf)

    lq, sumlx, suml2 = fit(_div(float(-nmax), mx))
    big_l = lq + nmax
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        num = -(np.float32(nmax) + np.float32(0.1) * np.float32(step))
        lq, sumlx, suml2 = fit(_div(float(num), mx))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        big_l = torch.where(better, lq + nmax, big_l)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    scale = torch.where(zero_group, torch.zeros_like(scale), scale)
    big_l = torch.where(zero_group, torch.zeros_like(big_l), big_l)
    return scale, big_l


def _quantize_q6_k_rows(weight: torch.Tensor) -> torch.Tensor:
    """One slice of rows (see the public function of the same type)."""
    rows = weight.shape[0]
    blocks = _to_blocks(weight)
    nblk = blocks.shape[0]
    xs = blocks.reshape(nblk * 16, 16).T.contiguous()  # [16, M]: one column per 16-value sub-block
    scales, big_l = _make_qx_quants_rmse1(xs, 32)
    scales = scales.reshape(nblk, 16)
    big_l = big_l.T.reshape(nblk, 16, 16)

    first = scales.abs().argmax(1, keepdim=True)
    max_abs = scales.abs().gather(1, first)[:, 0]
    max_scale = scales.gather(1, first)[:, 0]
    empty = max_abs < _GROUP_MAX_EPS  # the whole block is written as zeros

    iscale = _div(-128.0, max_scale)
    d16 = _div(1.0, iscale).to(torch.float16)
    qscale = _nearest_int(iscale[:, None] * scales).clamp(max=127)  # fits int8: |iscale*s| <= 128
    d = (d16.float()[:, None] * qscale.float())[:, :, None]
    xb = blocks.reshape(nblk, 16, 16)
    requant = _nearest_int(xb / d).clamp(-32, 31) + 32
    big_l = torch.where(d != 0, requant, big_l).reshape(nblk, 2, 4, 32)

    ql = torch.cat(
        [
            (big_l[:, :, 0] & 0xF) | ((big_l[:, :, 2] & 0xF) << 4),
            (big_l[:, :, 1] & 0xF) | ((big_l[:, :, 3] & 0xF) << 4),
        ],
        dim=2,
    ).reshape(nblk, 128)
    shifts = torch.tensor([0, 2, 4, 6], dtype=big_l.dtype).reshape(1, 1, 4, 1)
    qh = ((big_l >> 4) << shifts).sum(2).reshape(nblk, 64)
    out = torch.cat(
        [ql.to(torch.uint8), qh.to(torch.uint8), qscale.to(torch.int8).view(torch.uint8), _fp16_bytes(d16)],
        dim=1,
    )
    out[empty] = 0
    return out.reshape(rows, -1)


def quantize_q6_k(weight: torch.Tensor, step_weights: int = STEP_WEIGHTS) -> torch.Tensor:
    """``weight [out, in]`` -> ``uint8 [out, in/256*210]``, the bytes of ggml's quantize_row_q6_K_ref."""
    return _by_rows(_quantize_q6_k_rows, weight, step_weights)


# ---------------------------------------------------------------------------------------- dequantize


def _from_blocks(data: torch.Tensor, type_size: int) -> torch.Tensor:
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] % type_size:
        raise ValueError(
            f"expected uint8 [rows, k*{type_size}] block bytes, got {data.dtype} {tuple(data.shape)}"
        )
    return data.reshape(-1, type_size)


def _fp16_at(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()[:, 0]


def _unpack_scales_k4(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for j = 0..7: (scales, mins) as float32 [N, 8]."""
    raw = raw.to(torch.int32)
    lo, mid, hi = raw[:, 0:4], raw[:, 4:8], raw[:, 8:12]
    sc = torch.cat([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], dim=1)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _dequantize_qkx(data: torch.Tensor, type_size: int, five_bit: bool) -> torch.Tensor:
    rows = data.shape[0]
    blocks = _from_blocks(data, type_size)
    d = _fp16_at(blocks, 0)
    dmin = _fp16_at(blocks, 2)
    sc, mn = _unpack_scales_k4(blocks[:, 4:16])
    qs = blocks[:, -128:].to(torch.int32).reshape(-1, 4, 1, 32)
    q = ((qs >> torch.tensor([0, 4], device=qs.device).reshape(1, 1, 2, 1)) & 0xF).reshape(-1, 8, 32)
    if five_bit:
        qh = blocks[:, 16:48].to(torch.int32).reshape(-1, 1, 32)
        q = q | (((qh >> torch.arange(8, device=qh.device).reshape(1, 8, 1)) & 1) << 4)
    scale = (d[:, None] * sc)[:, :, None]
    offset = (dmin[:, None] * mn)[:, :, None]
    return (scale * q.float() - offset).reshape(rows, -1)


def dequantize_q4_k(data: torch.Tensor) -> torch.Tensor:
    """q4_K block bytes ``uint8 [out, in/256*144]`` -> float32 ``[out, in]`` (ggml's dequantize_row_q4_K)."""
    return _dequantize_qkx(data, TYPE_SIZE["q4_K"], five_bit=False)


def dequantize_q5_k(data: torch.Tensor) -> torch.Tensor:
    """q5_K block bytes ``uint8 [out, in/256*176]`` -> float32 ``[out, in]`` (ggml's dequantize_row_q5_K)."""
    return _dequantize_qkx(data, TYPE_SIZE["q5_K"], five_bit=True)


def dequantize_q6_k(data: torch.Tensor) -> torch.Tensor:
    """q6_K block bytes ``uint8 [out, in/256*210]`` -> float32 ``[out, in]`` (ggml's dequantize_row_q6_K)."""
    rows = data.shape[0]
    blocks = _from_blocks(data, TYPE_SIZE["q6_K"])
    ql = blocks[:, 0:128].to(torch.int32).reshape(-1, 2, 1, 64)
    qh = blocks[:, 128:192].to(torch.int32).reshape(-1, 2, 1, 32)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = _fp16_at(blocks, 208)
    low = ((ql >> torch.tensor([0, 4], device=ql.device).reshape(1, 1, 2, 1)) & 0xF).reshape(-1, 2, 4, 32)
    high = ((qh >> torch.tensor([0, 2, 4, 6], device=qh.device).reshape(1, 1, 4, 1)) & 3).reshape(
        -1, 2, 4, 32
    )
    q = ((low | (high << 4)) - 32).reshape(-1, 16, 16).float()
    return ((d[:, None] * scales)[:, :, None] * q).reshape(rows, -1)


# ---- registration -----------------------------------------------------------------------------------

KQUANT_FUNCTIONS = {
    GGMLQuantizationType.Q4_K: (quantize_q4_k, dequantize_q4_k),
    GGMLQuantizationType.Q5_K: (quantize_q5_k, dequantize_q5_k),
    GGMLQuantizationType.Q6_K: (quantize_q6_k, dequantize_q6_k),
}
for _type, (_quantize, _dequantize) in KQUANT_FUNCTIONS.items():
    register_format(_type, _quantize, _dequantize)

_BYTES = "bytes identical to llama.cpp's reference quantizer"
Q4_K = ggml_method(
    "q4_k",
    GGMLQuantizationType.Q4_K,
    f"llama.cpp Q4_K: 4-bit, 6-bit scales and minimums per 32 in super-blocks of 256 ({_BYTES})",
)
Q5_K = ggml_method(
    "q5_k",
    GGMLQuantizationType.Q5_K,
    f"llama.cpp Q5_K: 5-bit, 6-bit scales and minimums per 32 in super-blocks of 256 ({_BYTES})",
)
Q6_K = ggml_method(
    "q6_k",
    GGMLQuantizationType.Q6_K,
    f"llama.cpp Q6_K: 6-bit symmetric, 8-bit scales per 16 in super-blocks of 256 ({_BYTES})",
)
