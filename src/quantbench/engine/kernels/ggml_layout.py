"""llama.cpp (GGML) block formats on the engine's Triton kernels: each layer's blocks converted once.

A ``GGMLLinear`` keeps llama.cpp's bytes (its export is a byte copy). The kernels read a
:class:`~quantbench.engine.kernels.layouts.WQLayout` (``MODE_INT``: ``w = (u - zero) * scale`` per (row,
group)), so :func:`ggml_layout` converts a layer's blocks once, on their device, into codes and scales
whose formula gives exactly the float32 weights of llama.cpp's ``dequantize_row_*`` (the same operations
in the same order), and :func:`~quantbench.engine.kernels.layouts.layout_for` caches the result on the
module. The blocks stay as they are; the converted copy is extra memory (about one more copy of the
layer, see ``bits_per_weight`` below).

====  ======================  ====  ========================  =========================================
type  codes the kernels read  zero  scale per (row, group)    offset per (row, group)
====  ======================  ====  ========================  =========================================
q8_0  int8 (signed)            128  ``d`` fp16, per 32        -
q4_0  4-bit                      8  ``d`` fp16, per 32        -
q5_0  8-bit (0..31)             16  ``d`` fp16, per 32        -
q4_1  4-bit                      0  ``d`` fp16, per 32        ``-m`` fp16
q5_1  8-bit (0..31)              0  ``d`` fp16, per 32        ``-m`` fp16
q4_K  4-bit                      0  ``d * sc`` fp32, per 32   ``dmin * m``: uint8 ``m``, fp16 ``dmin`` per 256
q5_K  8-bit (0..31)              0  ``d * sc`` fp32, per 32   as q4_K
q6_K  8-bit (0..63)             32  ``d * sc`` fp32, per 16   -
====  ======================  ====  ========================  =========================================

llama.cpp computes ``d * sc`` (k-quants) and ``dmin * m`` in float32 before the codes; those products are
stored here in float32 (a fp16 ``d`` times a 6- or 8-bit ``sc`` does not always fit fp16), the fp16
fields as they are. The offset types (``w = d * q - m``) cannot be written as ``(u - zero) * scale`` with
an integer zero point the kernels decode exactly, so their layouts carry a :class:`GroupOffsets`;
``kernels/offsets.py`` subtracts the offset term of a product (``kernels.linear`` sends such layouts
there) and the prompt slabs of ``dequant.py`` subtract it from each weight.

Codes are reordered into the kernels' order (column ``c`` of a row in slot ``c % VALS`` of word
``c // VALS``; llama.cpp packs a block's nibbles as ``j`` / ``j + 16`` or ``j`` / ``j + 32``) and, where the
engine's batch-1 GEMV has a tile for the format (``layouts.gemv_tile``), stored tile-major right away.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from quantbench.engine.kernels.layouts import MODE_INT, WQLayout, gemv_tile
from quantbench.quant.rtn import pack_int4

__all__ = [
    "GroupOffsets",
    "bits_per_weight",
    "convert_blocks",
    "ggml_layout",
    "layout_weights",
    "supported_types",
]

T = GGMLQuantizationType
CHUNK_ELEMS = 1 << 24  # weights converted per pass (bounds the temporaries on the GPU)


@dataclass
class GroupOffsets:
    """``offset[n, g]`` subtracted from every weight of row ``n``, group ``g``: ``values`` as they are
    (float), or ``scale[n, g // sub] * values`` in float32 (uint8 ``values``). Row-major."""

    values: torch.Tensor  # [N, G]
    scale: torch.Tensor | None = None  # [N, G // sub]
    sub: int = 1

    @property
    def nbytes(self) -> int:
        total = self.values.numel() * self.values.element_size()
        if self.scale is not None:
            total += self.scale.numel() * self.scale.element_size()
        return total

    def dense(self) -> torch.Tensor:
        """float32 ``[N, G]``: the offset of every (row, group), as llama.cpp computes it."""
        if self.scale is None:
            return self.values.float()
        return self.scale.float().repeat_interleave(self.sub, dim=1) * self.values.float()


@dataclass
class Converted:
    """One layer's blocks in kernel form (row-major): packed codes, scales, offsets."""

    codes: torch.Tensor  # uint8 [N, K * bits / 8]
    scales: torch.Tensor  # [N, K / group]
    offsets: GroupOffsets | None


@dataclass(frozen=True)
class _Form:
    bits: int  # code width the kernels read
    group: int  # columns per scale / offset
    zero: float  # zero point subtracted from every code
    signed8: bool  # int8 codes stored in two's complement
    offset_sub: int  # groups per offset scale (0: no offsets; 1: float offsets)
    unpack: Callable[[torch.Tensor], tuple]  # [n, nb, type_size] -> (codes [n, K], scales, values, scale)


# ---- per-type unpacking: one chunk of rows of blocks [n, nb, type_size] ----------------------------------


def _fp16(two: torch.Tensor) -> torch.Tensor:
    """Bytes ``[..., 2]`` -> the fp16 they hold ``[...]``."""
    return two.contiguous().view(torch.float16)[..., 0]


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _nibbles_j16(qs: torch.Tensor) -> torch.Tensor:
    """Legacy 16 bytes ``[..., 16]`` -> 32 codes: byte ``j`` holds code ``j`` (low) and ``j + 16`` (high)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _bits_of(qh: torch.Tensor, count: int) -> torch.Tensor:
    """Little-endian bit field ``[..., count / 8]`` bytes -> bit ``i`` for i < count, as uint8 ``[..., count]``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh[..., None] >> shifts) & 1).flatten(-2)


def _unpack_q8_0(b: torch.Tensor) -> tuple:
    return _rows(b[..., 2:]), _fp16(b[..., 0:2]), None, None


def _unpack_q4_0(b: torch.Tensor) -> tuple:
    return _rows(_nibbles_j16(b[..., 2:])), _fp16(b[..., 0:2]), None, None


def _unpack_q5_0(b: torch.Tensor) -> tuple:
    codes = _nibbles_j16(b[..., 6:]) | (_bits_of(b[..., 2:6], 32) << 4)
    return _rows(codes), _fp16(b[..., 0:2]), None, None


def _unpack_q4_1(b: torch.Tensor) -> tuple:
    return _rows(_nibbles_j16(b[..., 4:])), _fp16(b[..., 0:2]), -_fp16(b[..., 2:4]), None


def _unpack_q5_1(b: torch.Tensor) -> tuple:
    codes = _nibbles_j16(b[..., 8:]) | (_bits_of(b[..., 4:8], 32) << 4)
    return _rows(codes), _fp16(b[..., 0:2]), -_fp16(b[..., 2:4]), None


def _scale_min_k4(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's get_scale_min_k4 for j = 0..7 of the 12 packed bytes ``[..., 12]``: (sc, m) uint8 ``[..., 8]``."""
    lo, mid, hi = raw[..., 0:4], raw[..., 4:8], raw[..., 8:12]
    sc = torch.cat((lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)), dim=-1)
    mn = torch.cat((mid & 63, (hi >> 4) | ((mid >> 6) << 4)), dim=-1)
    return sc, mn


def _kquant_low(qs: torch.Tensor) -> torch.Tensor:
    """q4_K / q5_K's 128 bytes ``[n, nb, 128]`` -> low 4 bits ``[n, nb, 8, 32]``: in each 64 columns, byte
    ``l`` holds column ``l`` (low nibble) and ``l + 32`` (high nibble)."""
    q = qs.reshape(*qs.shape[:2], 4, 1, 32)
    return torch.cat((q & 0x0F, q >> 4), dim=3).reshape(*qs.shape[:2], 8, 32)


def _unpack_qkx(b: torch.Tensor, five_bit: bool) -> tuple:
    d, dmin = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])
    sc, mn = _scale_min_k4(b[..., 4:16])
    codes = _kquant_low(b[..., -128:])
    if five_bit:  # bit s of qh[l] is bit 4 of column 32 * s + l
        qh = b[..., 16:48]
        shifts = torch.arange(8, dtype=torch.uint8, device=b.device)[:, None]
        codes = codes | (((qh[:, :, None, :] >> shifts) & 1) << 4)
    scale = d.float()[..., None] * sc.float()  # float d1 = d * sc
    return _rows(codes), _rows(scale), _rows(mn), dmin


def _unpack_q4_k(b: torch.Tensor) -> tuple:
    return _unpack_qkx(b, five_bit=False)


def _unpack_q5_k(b: torch.Tensor) -> tuple:
    return _unpack_qkx(b, five_bit=True)


def _unpack_q6_k(b: torch.Tensor) -> tuple:
    n, nb = b.shape[:2]
    ql = b[..., 0:128].reshape(n, nb, 2, 1, 64)
    low = torch.cat((ql & 0x0F, ql >> 4), dim=3).reshape(n, nb, 2, 4, 32)  # t = 2 * nibble + half
    qh = b[..., 128:192].reshape(n, nb, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(4, 1)
    high = (qh >> shifts) & 3  # [n, nb, 2, 4, 32]
    codes = low | (high << 4)  # column 128 * half + 32 * t + l
    sc = b[..., 192:208].contiguous().view(torch.int8)
    scale = _fp16(b[..., 208:210]).float()[..., None] * sc.float()  # d * sc, per 16 columns
    return _rows(codes), _rows(scale), None, None


_FORMS: dict[GGMLQuantizationType, _Form] = {
    T.Q8_0: _Form(8, 32, 128.0, True, 0, _unpack_q8_0),
    T.Q4_0: _Form(4, 32, 8.0, False, 0, _unpack_q4_0),
    T.Q5_0: _Form(8, 32, 16.0, False, 0, _unpack_q5_0),
    T.Q4_1: _Form(4, 32, 0.0, False, 1, _unpack_q4_1),
    T.Q5_1: _Form(8, 32, 0.0, False, 1, _unpack_q5_1),
    T.Q4_K: _Form(4, 32, 0.0, False, 8, _unpack_q4_k),
    T.Q5_K: _Form(8, 32, 0.0, False, 8, _unpack_q5_k),
    T.Q6_K: _Form(8, 16, 32.0, False, 0, _unpack_q6_k),
}


def supported_types() -> tuple[GGMLQuantizationType, ...]:
    """The GGML types the kernels run (every type quantbench implements)."""
    return tuple(_FORMS)


def _scale_dtype(ggml_type: GGMLQuantizationType) -> torch.dtype:
    """fp16 where the scale is llama.cpp's stored ``d``; float32 for the k-quants' products ``d * sc``."""
    return torch.float32 if ggml_type in (T.Q4_K, T.Q5_K, T.Q6_K) else torch.float16


def bits_per_weight(ggml_type: GGMLQuantizationType) -> float:
    """Bits per weight of the kernel form (codes, scales, offsets), to set beside llama.cpp's own."""
    ggml_type = GGMLQuantizationType(ggml_type)
    form = _FORMS[ggml_type]
    scale_bits = 8 * _scale_dtype(ggml_type).itemsize
    if form.offset_sub <= 1:
        offset_bits = 16.0 * form.offset_sub  # none, or an fp16 offset per group
    else:
        offset_bits = 8.0 + 16.0 / form.offset_sub  # uint8 per group, fp16 scale per offset_sub groups
    return form.bits + (scale_bits + offset_bits) / form.group


def convert_blocks(ggml_type: GGMLQuantizationType, blocks: torch.Tensor) -> Converted:
    """llama.cpp blocks ``uint8 [N, K / block_size * type_size]`` (one row of the weight per row) in the
    kernels' form, computed on ``blocks``' device in row chunks."""
    ggml_type = GGMLQuantizationType(ggml_type)
    form = _FORMS[ggml_type]
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % type_size:
        raise ValueError(
            f"expected uint8 [rows, n * {type_size}] blocks, got {blocks.dtype} {tuple(blocks.shape)}"
        )
    n, nb = blocks.shape[0], blocks.shape[1] // type_size
    k = nb * block_size
    groups = k // form.group
    dev = blocks.device
    codes = torch.empty((n, k * form.bits // 8), dtype=torch.uint8, device=dev)
    scales = torch.empty((n, groups), dtype=_scale_dtype(ggml_type), device=dev)
    offsets = None
    if form.offset_sub == 1:
        offsets = GroupOffsets(torch.empty((n, groups), dtype=torch.float16, device=dev))
    elif form.offset_sub:
        offsets = GroupOffsets(
            torch.empty((n, groups), dtype=torch.uint8, device=dev),
            torch.empty((n, groups // form.offset_sub), dtype=torch.float16, device=dev),
            form.offset_sub,
        )
    step = max(1, CHUNK_ELEMS // k)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        u, s, values, vscale = form.unpack(blocks[r0:r1].reshape(r1 - r0, nb, type_size))
        codes[r0:r1] = pack_int4(u) if form.bits == 4 else u
        scales[r0:r1] = s
        if offsets is not None:
            offsets.values[r0:r1] = values
            if offsets.scale is not None:
                offsets.scale[r0:r1] = vscale
    return Converted(codes, scales, offsets)


def _tile_major(t: torch.Tensor, tile_n: int, tile_c: int) -> torch.Tensor:
    """``t [N, C]`` stored as ``[N / tile_n, C / tile_c, tile_n, tile_c]`` (returned viewed as ``[N, C]``)."""
    n, c = t.shape
    return t.view(n // tile_n, tile_n, c // tile_c, tile_c).transpose(1, 2).contiguous().view(n, c)


def ggml_layout(module: nn.Module) -> WQLayout | None:
    """The kernel layout of a ``GGMLLinear`` (its blocks converted, see the module docstring), or None when
    the kernels do not run it (a type without a kernel form, a compute dtype other than fp16 / bf16)."""
    ggml_type = GGMLQuantizationType(module.ggml_type)
    if ggml_type not in _FORMS or module.compute_dtype not in (torch.float16, torch.bfloat16):
        return None
    form = _FORMS[ggml_type]
    n, k = module.out_features, module.in_features
    conv = convert_blocks(ggml_type, module.row_major("blocks"))
    layout = WQLayout(
        in_features=k,
        out_features=n,
        bits=form.bits,
        mode=MODE_INT,
        w32=conv.codes.view(torch.int32),
        scales=conv.scales,
        scale_stride=conv.scales.shape[1],
        group=form.group,
        zero_const=form.zero,
        signed8=form.signed8,
        bias=module.bias,
        offsets=conv.offsets,
    )
    tile = gemv_tile(layout)
    kw = layout.w32.shape[1]
    if tile is not None and n % tile[0] == 0 and kw % tile[1] == 0:
        # tile-major from the start (the blocks themselves stay row-major for export)
        tile_n, tile_kv = tile
        layout.w32 = _tile_major(layout.w32, tile_n, tile_kv)
        layout.scales = _tile_major(conv.scales, tile_n, 1)
        layout.tile_n, layout.tile_kv = tile_n, tile_kv
    return layout


# ---- the layout's formula in torch (the reference the tests hold the conversion and the kernels to) --------


def _untile(t: torch.Tensor, n: int, tile_n: int, tile_c: int) -> torch.Tensor:
    flat = t.reshape(-1)
    c = flat.numel() // n
    return flat.view(n // tile_n, c // tile_c, tile_n, tile_c).transpose(1, 2).reshape(n, c)


def layout_weights(layout: WQLayout) -> torch.Tensor:
    """float32 ``[N, K]`` of a ``MODE_INT`` group-wise layout by its formula ``(u - zero) * scale - offset``,
    each operation rounded to float32 as llama.cpp's ``dequantize_row_*`` rounds it."""
    n, k = layout.out_features, layout.in_features
    w32 = layout.w32
    scales = layout.scales
    if layout.tile_n:
        w32 = _untile(w32, n, layout.tile_n, layout.tile_kv)
        scales = _untile(scales, n, layout.tile_n, 1)
    raw = w32.contiguous().view(torch.uint8).reshape(n, -1)
    if layout.bits == 4:
        u = torch.stack((raw & 0x0F, raw >> 4), dim=-1).reshape(n, k)
    else:
        u = raw ^ 0x80 if layout.signed8 else raw
    if layout.zeros is not None:
        raise ValueError("layout_weights: per-group zero points are not a GGML layout")
    scale = scales.reshape(n, -1).float().repeat_interleave(layout.group, dim=1)
    w = (u.float() - layout.zero_const) * scale
    if layout.offsets is not None:
        w = w - layout.offsets.dense().repeat_interleave(layout.group, dim=1)
    return w
