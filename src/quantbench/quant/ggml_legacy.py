"""llama.cpp's original block formats q8_0, q4_0, q4_1, q5_0 and q5_1, bit-exact in torch.

Every type cuts a row into blocks of 32 weights; all multi-byte fields are little-endian, ``d`` and
``m`` are IEEE fp16. Bytes of one block (``type_size``), in order:

* ``q8_0`` (34 B, 8.5 bits/weight): ``d``, then 32 int8 codes ``q``; ``w = q * d``.
* ``q4_0`` (18 B, 4.5): ``d``, then 16 bytes ``qs``; byte ``j`` holds weight ``j`` in its low nibble and
  weight ``j + 16`` in its high nibble; ``w = (nibble - 8) * d``.
* ``q4_1`` (20 B, 5.0): ``d``, ``m`` (the block minimum), ``qs`` as q4_0; ``w = nibble * d + m``.
* ``q5_0`` (22 B, 5.5): ``d``, 4 bytes ``qh`` (a uint32 whose bit ``i`` is bit 4 of weight ``i``'s code),
  ``qs`` (the low 4 bits, as q4_0); ``w = (code - 16) * d``.
* ``q5_1`` (24 B, 6.0): ``d``, ``m``, ``qh``, ``qs``; ``w = code * d + m``.

The quantizers reproduce llama.cpp's reference ones (``quantize_row_q4_0_ref`` ... in
``ggml/src/ggml-quants.c``: what ``llama-quantize`` runs without an importance matrix, and what gguf-py's
numpy code copies) in float32, step by step: the scale is the block's signed absolute maximum divided
by -8 / -16 (q4_0, q5_0), the range divided by 15 / 31 (q4_1, q5_1) or the absolute maximum divided by
127 (q8_0); codes use the float32 reciprocal of the unrounded scale, and the fp16 scale is stored
(rounded to nearest even). The rounding differs per type, as in C: q8_0 uses ``roundf`` (half away
from zero), the others add 8.5 / 16.5 / 0.5 and truncate toward zero, i.e. round half up.

"Bit-exact" means equal to the C reference evaluated as written, every float32 operation rounded
(as gguf-py computes, and C compiled without floating-point contraction). A build that contracts
``x*id + 8.5f`` into one fused multiply-add (GCC's default once FMA is enabled, e.g. ``-march=native``)
rounds once instead of twice, so a product within an ulp of a code boundary can land on the other
code: rare, seen on q4_0 / q5_0 blocks of integer-valued weights.

Where gguf-py's numpy port and the C code disagree (only in the sign of a zero scale or minimum, in
blocks whose extreme values are zeros), this follows the C code; the comments at ``_signed_absmax``
and ``_first_equal`` say how.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from quantbench.quant.ggml import ggml_method, register_format

QK = 32  # weights per block, every legacy type


def _blocks(weight: torch.Tensor) -> torch.Tensor:
    """``weight [rows, cols]`` as float32 blocks ``[rows, cols / 32, 32]``."""
    if weight.dim() != 2 or weight.shape[1] % QK:
        raise ValueError(
            f"expected a [rows, cols] weight with cols a multiple of {QK}, got {tuple(weight.shape)}"
        )
    return weight.detach().to(torch.float32).reshape(weight.shape[0], weight.shape[1] // QK, QK)


def _flat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-block byte fields ``[rows, n_blocks, *]`` into rows of whole blocks."""
    out = torch.cat(parts, dim=-1)
    return out.reshape(out.shape[0], -1)


def _fp16_bytes(value: torch.Tensor) -> torch.Tensor:
    """float32 ``[..., 1]`` -> its fp16 bit pattern as 2 little-endian bytes ``[..., 2]``."""
    return value.to(torch.float16).view(torch.uint8)


def _fp16_value(two_bytes: torch.Tensor) -> torch.Tensor:
    """2 bytes ``[..., 2]`` -> the fp16 they hold, as float32 ``[..., 1]`` (exact)."""
    return two_bytes.contiguous().view(torch.float16).to(torch.float32)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """C's ``id = d ? 1.0f/d : 0.0f`` (an all-zero block gets all-zero codes, not NaNs)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per block, the value with the largest magnitude, keeping its sign: ``[rows, n_blocks, 1]``.

    The C loop updates on ``amax < fabsf(v)``, so among equal magnitudes (``+a`` and ``-a``) the first
    one wins, as ``argmax`` returns the first maximum. When the block is all zeros the loop never
    updates and ``max`` keeps its initial ``+0.0``, whatever the zeros' signs; gguf-py takes the first
    element (possibly ``-0.0``) instead, which flips the sign of the stored zero scale.
    """
    value = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))
    return torch.where(value == 0, torch.zeros_like(value), value)


def _first_equal(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per block, the first element equal to ``target [rows, n_blocks, 1]``.

    The C min / max loops (``if (v < min) min = v``) keep the first of equal values, which only matters
    for ``+0.0`` vs ``-0.0``: ``amin`` / ``amax`` may return either, and the sign reaches the stored
    ``m`` (and the sign of a zero ``d``).
    """
    first = (x == target).to(torch.uint8).argmax(dim=-1, keepdim=True)
    return x.gather(-1, first)


def _min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = _first_equal(x, x.amin(dim=-1, keepdim=True))
    hi = _first_equal(x, x.amax(dim=-1, keepdim=True))
    return lo, hi


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: to nearest, halves away from zero (``torch.round`` rounds halves to even).

    ``floor(|v| + 0.5)`` would be wrong just below a half (0.49999997 + 0.5 rounds up to 1.0 in
    float32); the fraction ``|v| - floor(|v|)`` is exact, so doubling it and flooring tells whether it
    is at least a half without any rounding.
    """
    a = v.abs()
    whole = torch.floor(a)
    return torch.sign(v) * (whole + torch.floor(2 * (a - whole)))


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[..., 32]`` -> 16 bytes: weight ``j`` in the low nibble of byte ``j``, ``j + 16`` in the high."""
    return (codes[..., : QK // 2] & 0x0F) | ((codes[..., QK // 2 :] & 0x0F) << 4)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes ``[..., 16]`` -> the 32 low-4-bit codes ``[..., 32]`` (inverse of :func:`_pack_nibbles`)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _pack_high_bits(codes: torch.Tensor) -> torch.Tensor:
    """Bit 4 of 32 codes ``[..., 32]`` -> a little-endian uint32 ``[..., 4]`` whose bit ``i`` is code ``i``'s."""
    bits = ((codes >> 4) & 1).reshape(*codes.shape[:-1], 4, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    return (bits << shifts).sum(dim=-1).to(torch.uint8)


def _unpack_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """A little-endian uint32 ``[..., 4]`` -> bit ``i`` of it, shifted to bit 4, for ``i`` in 0..31."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return (((qh.unsqueeze(-1) >> shifts) & 1) << 4).flatten(-2)


def _split(blocks: torch.Tensor, type_size: int, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """Rows of whole blocks ``[rows, n_blocks * type_size]`` -> the fields ``[rows, n_blocks, size]``."""
    if blocks.dim() != 2 or blocks.shape[1] % type_size:
        raise ValueError(f"expected [rows, n_blocks * {type_size}] bytes, got {tuple(blocks.shape)}")
    b = blocks.reshape(blocks.shape[0], -1, type_size)
    return list(torch.split(b, sizes, dim=-1))


def _rows(w: torch.Tensor) -> torch.Tensor:
    """Float32 blocks ``[rows, n_blocks, 32]`` -> ``[rows, n_blocks * 32]``."""
    return w.reshape(w.shape[0], -1)


# ---- q8_0 -------------------------------------------------------------------------------------------


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """``weight [rows, cols]`` (cols a multiple of 32) -> q8_0 bytes ``[rows, cols / 32 * 34]``."""
    x = _blocks(weight)
    d = x.abs().amax(dim=-1, keepdim=True) / 127
    q = _roundf(x * _inverse(d))
    return _flat([_fp16_bytes(d), q.to(torch.int8).view(torch.uint8)])


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """q8_0 bytes ``[rows, n_blocks * 34]`` -> float32 ``[rows, n_blocks * 32]``."""
    d, qs = _split(blocks, 34, (2, 32))
    return _rows(qs.contiguous().view(torch.int8).to(torch.float32) * _fp16_value(d))


# ---- q4_0 / q5_0: symmetric, scale from the signed absolute maximum -------------------------------------


def _quantize_sym(weight: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in ``[0, 2 * half - 1]`` and the float32 scale of q4_0 (``half=8``) / q5_0 (``half=16``)."""
    x = _blocks(weight)
    d = _signed_absmax(x) / -half
    # C: MIN(2*half - 1, (int8_t)(x*id + half + 0.5f)); the sum is >= 0.5, so truncation is a floor.
    codes = torch.trunc(x * _inverse(d) + (half + 0.5)).clamp(max=2 * half - 1)
    return codes.to(torch.uint8), d


def quantize_q4_0(weight: torch.Tensor) -> torch.Tensor:
    """``weight [rows, cols]`` -> q4_0 bytes ``[rows, cols / 32 * 18]``."""
    codes, d = _quantize_sym(weight, 8)
    return _flat([_fp16_bytes(d), _pack_nibbles(codes)])


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """q4_0 bytes ``[rows, n_blocks * 18]`` -> float32 ``[rows, n_blocks * 32]``."""
    d, qs = _split(blocks, 18, (2, 16))
    return _rows((_unpack_nibbles(qs).to(torch.float32) - 8) * _fp16_value(d))


def quantize_q5_0(weight: torch.Tensor) -> torch.Tensor:
    """``weight [rows, cols]`` -> q5_0 bytes ``[rows, cols / 32 * 22]``."""
    codes, d = _quantize_sym(weight, 16)
    return _flat([_fp16_bytes(d), _pack_high_bits(codes), _pack_nibbles(codes)])


def dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """q5_0 bytes ``[rows, n_blocks * 22]`` -> float32 ``[rows, n_blocks * 32]``."""
    d, qh, qs = _split(blocks, 22, (2, 4, 16))
    codes = _unpack_nibbles(qs) | _unpack_high_bits(qh)
    return _rows((codes.to(torch.float32) - 16) * _fp16_value(d))


# ---- q4_1 / q5_1: asymmetric, scale from the range and the minimum as offset ---------------------------


def _quantize_asym(weight: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes in ``[0, levels]``, float32 scale and minimum of q4_1 (``levels=15``) / q5_1 (``levels=31``)."""
    x = _blocks(weight)
    lo, hi = _min_max(x)
    d = (hi - lo) / levels
    # C: (uint8_t)((x - min)*id + 0.5f), q4_1 also MIN(15, .); the sum is >= 0.5, so truncation is a floor.
    # The clamp only guards the top code against a product that rounds a hair above ``levels``.
    codes = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(max=levels)
    return codes.to(torch.uint8), d, lo


def quantize_q4_1(weight: torch.Tensor) -> torch.Tensor:
    """``weight [rows, cols]`` -> q4_1 bytes ``[rows, cols / 32 * 20]``."""
    codes, d, m = _quantize_asym(weight, 15)
    return _flat([_fp16_bytes(d), _fp16_bytes(m), _pack_nibbles(codes)])


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """q4_1 bytes ``[rows, n_blocks * 20]`` -> float32 ``[rows, n_blocks * 32]``."""
    d, m, qs = _split(blocks, 20, (2, 2, 16))
    # Two float32 roundings (product, then sum), as the C code and gguf-py compute x*d + m.
    return _rows(_unpack_nibbles(qs).to(torch.float32) * _fp16_value(d) + _fp16_value(m))


def quantize_q5_1(weight: torch.Tensor) -> torch.Tensor:
    """``weight [rows, cols]`` -> q5_1 bytes ``[rows, cols / 32 * 24]``."""
    codes, d, m = _quantize_asym(weight, 31)
    return _flat([_fp16_bytes(d), _fp16_bytes(m), _pack_high_bits(codes), _pack_nibbles(codes)])


def dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """q5_1 bytes ``[rows, n_blocks * 24]`` -> float32 ``[rows, n_blocks * 32]``."""
    d, m, qh, qs = _split(blocks, 24, (2, 2, 4, 16))
    codes = _unpack_nibbles(qs) | _unpack_high_bits(qh)
    return _rows(codes.to(torch.float32) * _fp16_value(d) + _fp16_value(m))


# ---- registration -----------------------------------------------------------------------------------

_T = GGMLQuantizationType
register_format(_T.Q8_0, quantize_q8_0, dequantize_q8_0)
register_format(_T.Q4_0, quantize_q4_0, dequantize_q4_0)
register_format(_T.Q4_1, quantize_q4_1, dequantize_q4_1)
register_format(_T.Q5_0, quantize_q5_0, dequantize_q5_0)
register_format(_T.Q5_1, quantize_q5_1, dequantize_q5_1)

_BYTES = "bytes identical to llama.cpp's reference quantizer"
Q8_0 = ggml_method("q8_0", _T.Q8_0, f"llama.cpp Q8_0: int8 codes, one fp16 scale per 32 weights ({_BYTES})")
Q4_0 = ggml_method("q4_0", _T.Q4_0, f"llama.cpp Q4_0: 4-bit symmetric, fp16 scale per 32 weights ({_BYTES})")
Q4_1 = ggml_method(
    "q4_1", _T.Q4_1, f"llama.cpp Q4_1: 4-bit, fp16 scale and minimum per 32 weights ({_BYTES})"
)
Q5_0 = ggml_method("q5_0", _T.Q5_0, f"llama.cpp Q5_0: 5-bit symmetric, fp16 scale per 32 weights ({_BYTES})")
Q5_1 = ggml_method(
    "q5_1", _T.Q5_1, f"llama.cpp Q5_1: 5-bit, fp16 scale and minimum per 32 weights ({_BYTES})"
)
