"""How each quantized module's buffers map onto the Triton weight-quantized matmul (no Triton import).

``layout_for(module)`` returns a :class:`WQLayout` of *views* of the module's own buffers (the int32
view of the packed codes costs no memory), or ``None`` when the kernel cannot read that module (the
caller then uses the module's reference forward). Each QuantLinear class the kernels read registers its
builder here (``register_layout``); the quantization methods know nothing of the engine. Layouts are
cached on the module, keyed by its buffers and their tile-major storage, and rebuilt when a buffer is
replaced (``load_state_dict`` copies in place, so the cache stays valid then).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions
from quantbench.quant import bnb4
from quantbench.quant.fp8 import FP8Linear
from quantbench.quant.ggml import GGMLLinear
from quantbench.quant.llm_int8 import LLMInt8Linear
from quantbench.quant.rtn import RTNLinear
from quantbench.quant.smoothquant import SmoothQuantLinear

MODE_INT = 0  # w = (u - zero) * scale          (RTN int4 / int8)
MODE_TABLE = 1  # w = code[u] * absmax[block]     (bitsandbytes NF4 / FP4)
MODE_FP8 = 2  # w = float8_e4m3(u) * scale      (fp8)
MODE_PLAIN = 3  # w = u, 16-bit weights of the compute dtype (an unquantized nn.Linear; mma_gemv only)

# Activation quantization done before the matmul (W8A8 methods), reproducing each method's math.
ACT_NONE = 0
ACT_LLM_INT8 = 1  # per-token int8 over non-outlier columns (|x| >= threshold stays 16-bit)
ACT_FP8 = 2  # per-token e4m3, scale absmax / 448
ACT_INT8_TOKEN = 3  # per-token int8, scale max(absmax / 127, 1e-8) (SmoothQuant)
# rows of activations up to this many columns are quantized by one program holding the whole row
# (``fused.act_quant``'s row mode, ``fused.act_codes``)
ROW_TILE_MAX = 32768
# by the method names ``EngineOptions.mma_quantizes`` takes
ACT_BY_NAME = {"llm.int8": ACT_LLM_INT8, "fp8": ACT_FP8, "smoothquant": ACT_INT8_TOKEN}
# the 8-bit codes a W8A8 product multiplies (activations and weights alike), per activation kind
CODE_DTYPE_OF_ACT = {ACT_LLM_INT8: torch.int8, ACT_INT8_TOKEN: torch.int8, ACT_FP8: torch.float8_e4m3fn}


@dataclass
class WQLayout:
    in_features: int
    out_features: int
    bits: int
    mode: int
    w32: torch.Tensor  # int32 view of the codes, [N, K * bits / 32]
    scales: torch.Tensor  # per (row, group): fp16/fp32, or uint8 codes when dq_code is set
    scale_stride: int  # elements between rows of ``scales``
    group: int  # input columns per scale; 0 = one per row
    high_first: bool = False
    zeros: torch.Tensor | None = None  # uint8 per (row, group), same indexing as scales
    zero_const: float = 0.0  # the fixed zero point when ``zeros`` is None (MODE_INT)
    table: torch.Tensor | None = None  # fp32 [16] code values (MODE_TABLE)
    dq_code: torch.Tensor | None = None  # fp32 [256] map for uint8 absmax codes (double quant)
    dq_nested: torch.Tensor | None = None  # fp32 nested absmax, one per 256 blocks
    dq_offset: torch.Tensor | None = None  # fp32 scalar added after the nested dequantization
    bias: torch.Tensor | None = None
    scale_mul: float = 1.0  # constant factor on the stored scales (LLM.int8 stores absmax: 1/127)
    signed8: bool = False  # int8 codes in two's complement (then zero_const is 128)
    act_quant: int = ACT_NONE
    threshold: float = 0.0  # LLM.int8 outlier threshold
    # Tile-major storage (``QuantLinear.store_tiled``, ``tiling_for``): 0 = row-major. Codes are [N / tile_n,
    # K / (tile_kv * 32 / bits), tile_n, tile_kv] words; scales and zeros [N / tile_n, groups, tile_n].
    tile_n: int = 0
    tile_kv: int = 0
    group_buffers: tuple[str, ...] = ()  # the module's per-(row, group) buffers (tiled with the codes)
    key: tuple = ()
    plain_dtype: torch.dtype | None = None  # MODE_PLAIN: the weights' dtype (the activations' too)
    # MODE_INT: w = (u - zero) * scale - offset[row, group] (llama.cpp's q4_1, q4_K, ...:
    # ggml_layout.GroupOffsets); kernels.linear sends such layouts to kernels/offsets.py
    offsets: Any = None

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.group) if self.group else 1

    @property
    def weight_bytes(self) -> int:
        """Bytes one pass over this layer reads (codes + scales + zeros + nested stats)."""
        total = 0
        for t in (self.w32, self.scales, self.zeros, self.dq_nested, self.bias):
            if t is not None:
                total += t.numel() * t.element_size()
        return total + (self.offsets.nbytes if self.offsets is not None else 0)


_TABLE_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def _on(device: torch.device, name: str, make) -> torch.Tensor:
    key = (name, str(device))
    if key not in _TABLE_CACHE:
        _TABLE_CACHE[key] = make().to(device=device).contiguous()
    return _TABLE_CACHE[key]


def _key(module: nn.Module) -> tuple:
    tiles = tuple(sorted(getattr(module, "tiling", {}).items()))
    return (*((name, t.data_ptr(), tuple(t.shape)) for name, t in module.named_buffers(recurse=False)), tiles)


def mma_words_per_lane(layout: WQLayout) -> int:
    """Code words an ``mma_gemv`` lane loads per row and step (4 = one 16-byte load), 0 when no step fits:
    a step's ``4 * V * VALS`` columns must lie in one quantization group and divide K."""
    vals = 32 // layout.bits
    for words in (4, 2, 1):
        step = 4 * words * vals
        if layout.group == 0 or layout.group % step == 0:
            return words if layout.in_features % step == 0 else 0
    return 0


def mma_tile(layout: WQLayout, options: EngineOptions = DEFAULT_OPTIONS) -> tuple[int, int] | None:
    """Tile-major storage matching ``mma_gemv``'s warp steps (16 rows x 4V words) when it runs batch 1
    of this format (fp8 only with quantized activations), else None."""
    if not (options.mma and options.mma_batch1):
        return None
    if layout.bits not in (4, 8) or (layout.mode == MODE_FP8 and layout.act_quant == ACT_NONE):
        return None
    words = mma_words_per_lane(layout)
    return (16, 4 * words) if words else None


def gemv_tile(layout: WQLayout, options: EngineOptions = DEFAULT_OPTIONS) -> tuple[int, int] | None:
    """(rows, words per row) of one decode-step tile of codes, per format, or None to keep the codes
    row-major.

    Formats the tensor-core GEMV (``mma_gemv``) runs at batch 1: its warp step, 16 rows x 4 lanes x V
    words, so a step is one contiguous block. Otherwise the half2 GEMV's steps, from the H100 runs
    (docs/bench.md): NF4 / FP4 and 8-bit codes decode faster from tiles in the engine; symmetric int4
    measured faster row-major (2.73 vs 2.85 ms per token) although the isolated kernel preferred tiles;
    asymmetric int4 is tiled on the isolated-kernel sweep alone (71 -> 41 us on Mistral-7B's gate/up)."""
    tile = mma_tile(layout, options)
    if tile is not None:
        return tile
    if layout.mode == MODE_TABLE:
        return 128, 8
    if layout.bits == 4:
        return (256, 8) if layout.zeros is not None else None
    return 32, 32


def tiling_for(
    module: nn.Module, options: EngineOptions = DEFAULT_OPTIONS
) -> dict[str, tuple[int, int]] | None:
    """The buffers to store tile-major for the GEMV (``QuantLinear.store_tiled`` argument), or None
    when the module has no kernel layout, its format stays row-major, or its shape does not tile.
    (The choice depends on ``options``; the layout then follows the module's stored tiling.)"""
    layout = layout_for(module)
    if layout is None or layout.tile_n:
        return None
    tile = gemv_tile(layout, options)
    return None if tile is None else tile_buffers(module, layout, *tile)


def tile_buffers(
    module: nn.Module, layout: WQLayout, tile_n: int, tile_kv: int
) -> dict[str, tuple[int, int]] | None:
    """``store_tiled`` argument for GEMV steps of ``tile_n`` rows x ``tile_kv`` words (None: no fit)."""
    n, kw = layout.w32.shape
    if n % tile_n or kw % tile_kv or layout.w32.stride(0) != kw:
        return None
    tiles = {"qweight": (tile_n, 4 * tile_kv)}  # uint8 storage: 4 bytes per word
    if layout.group:
        for name in layout.group_buffers:
            if getattr(module, name, None) is not None:
                tiles[name] = (tile_n, 1)
    return tiles


def _apply_tiling(layout: WQLayout, module: nn.Module) -> WQLayout:
    tiles = getattr(module, "tiling", {})
    if "qweight" in tiles:
        layout.tile_n, words = tiles["qweight"][0], tiles["qweight"][1] // 4
        layout.tile_kv = words
        if layout.group:
            layout.scale_stride = layout.n_groups  # the logical row stride (the nested absmax index)
    return layout


def layout_for(module: nn.Module) -> WQLayout | None:
    """The kernel layout of ``module`` or None if the Triton kernel does not handle it."""
    key = _key(module)
    cached = getattr(module, "_qb_layout", None)
    if cached is not None and cached.key == key:
        return cached
    layout = _build(module)
    if layout is not None:
        layout = _apply_tiling(layout, module)
        layout.key = key
        module._qb_layout = layout
    return layout


def plain_layout_for(module: nn.Module) -> WQLayout | None:
    """A plain bf16 / fp16 ``nn.Linear`` as a :class:`WQLayout` for the tensor-core GEMV (``MODE_PLAIN``:
    the weights are the codes, row-major, viewed as int32 pairs; per-row scales of one), or None when its
    weight is not a contiguous 16-bit ``[N, K]`` with K a multiple of 16. Cached on the module."""
    w = module.weight
    key = (w.data_ptr(), tuple(w.shape), w.dtype, None if module.bias is None else module.bias.data_ptr())
    cached = getattr(module, "_qb_plain_layout", None)
    if cached is not None and cached.key == key:
        return cached
    n, k = w.shape
    if w.dtype not in (torch.bfloat16, torch.float16) or not w.is_contiguous() or k % 16 or w.data_ptr() % 16:
        return None
    layout = WQLayout(
        in_features=k,
        out_features=n,
        bits=16,
        mode=MODE_PLAIN,
        w32=w.detach().view(torch.int32),
        scales=_on(w.device, f"ones{n}", lambda: torch.ones(n)),
        scale_stride=1,
        group=0,
        bias=None if module.bias is None else module.bias.detach(),
        key=key,
        plain_dtype=w.dtype,
    )
    module._qb_plain_layout = layout
    return layout


# How each QuantLinear class maps onto the kernels (``register_layout``): the builder of the nearest class
# in a module's MRO, so GPTQ / AWQ (RTNLinear subclasses) share RTN's.
LayoutBuilder = Callable[[nn.Module], "WQLayout | None"]
_BUILDERS: dict[type, LayoutBuilder] = {}


def register_layout(cls: type) -> Callable[[LayoutBuilder], LayoutBuilder]:
    """Decorator: ``builder(module)`` gives the :class:`WQLayout` of modules of ``cls`` (and its subclasses
    without a builder of their own), or None where the kernels cannot read that module."""

    def register(builder: LayoutBuilder) -> LayoutBuilder:
        _BUILDERS[cls] = builder
        return builder

    return register


def _build(module: nn.Module) -> WQLayout | None:
    for cls in type(module).__mro__:
        builder = _BUILDERS.get(cls)
        if builder is not None:
            return builder(module)
    return None


def optional_quant_class(mod_name: str, cls_name: str) -> type | None:
    try:
        module = __import__(f"quantbench.quant.{mod_name}", fromlist=[cls_name])
    except ImportError:  # pragma: no cover - method not in this tree
        return None
    return getattr(module, cls_name, None)


def _w8a8_layout(
    m: nn.Module, scales: torch.Tensor, scale_mul: float, act: int, mode: int = MODE_INT
) -> WQLayout | None:
    """W8A8 modules: 8-bit codes ``[out, in]`` with one scale per output row; MODE_INT codes are int8
    in two's complement (zero 128 once the sign bit is flipped), MODE_FP8 codes e4m3."""
    n, k = m.out_features, m.in_features
    if k % 4 or m.compute_dtype not in (torch.float16, torch.bfloat16):
        return None
    w32 = _as_words(m.qweight.view(torch.uint8), n)
    if w32 is None:
        return None
    signed = mode == MODE_INT
    return WQLayout(
        in_features=k,
        out_features=n,
        bits=8,
        mode=mode,
        w32=w32,
        scales=scales,
        scale_stride=1,
        group=0,
        zero_const=128.0 if signed else 0.0,
        signed8=signed,
        scale_mul=scale_mul,
        act_quant=act,
        threshold=float(getattr(m, "threshold", 0.0)),
        bias=m.bias,
    )


@register_layout(LLMInt8Linear)
def _llm_int8_layout(m: nn.Module) -> WQLayout | None:
    return _w8a8_layout(m, m.row_absmax, 1.0 / 127.0, ACT_LLM_INT8)


@register_layout(SmoothQuantLinear)
def _smoothquant_layout(m: nn.Module) -> WQLayout | None:
    return _w8a8_layout(m, m.wscales, 1.0, ACT_INT8_TOKEN)


@register_layout(FP8Linear)
def _fp8_layout(m: nn.Module) -> WQLayout | None:
    return _w8a8_layout(m, m.weight_scale, 1.0, ACT_FP8, mode=MODE_FP8)


def _as_words(codes: torch.Tensor, rows: int) -> torch.Tensor | None:
    if not codes.is_contiguous() or codes.numel() % (4 * rows) or codes.data_ptr() % 4:
        return None
    return codes.view(torch.uint8).reshape(rows, -1).view(torch.int32)


@register_layout(RTNLinear)
def _rtn_layout(m: nn.Module) -> WQLayout | None:
    """RTN, and GPTQ / AWQ, which share its layout (GPTQ with act-order excepted: its columns are permuted
    by ``g_idx``)."""
    if getattr(m, "g_idx", None) is not None:
        return None
    n, k, bits = m.out_features, m.in_features, m.bits
    vals = 32 // bits
    per_row = m.group == k
    if k % vals or (not per_row and m.group % vals):
        return None
    w32 = _as_words(m.qweight, n)
    if w32 is None:
        return None
    return WQLayout(
        in_features=k,
        out_features=n,
        bits=bits,
        mode=MODE_INT,
        w32=w32,
        scales=m.scales,
        scale_stride=m.scales.stride(0),
        group=0 if per_row else m.group,
        zeros=m.qzeros,
        zero_const=float(2 ** (bits - 1)),
        bias=m.bias,
        group_buffers=("scales", "qzeros"),
    )


@register_layout(bnb4.Bnb4Linear)
def _bnb4_layout(m: nn.Module) -> WQLayout | None:
    n, k, bs = m.out_features, m.in_features, m.blocksize
    if k % bs or k % 8:
        return None  # blocks straddle rows: leave it to the reference path
    w32 = _as_words(m.qweight, n)
    if w32 is None:
        return None
    device = m.qweight.device
    layout = WQLayout(
        in_features=k,
        out_features=n,
        bits=4,
        mode=MODE_TABLE,
        w32=w32,
        scales=m.absmax,
        scale_stride=k // bs,
        group=bs,
        high_first=True,
        group_buffers=("absmax",),
        table=_on(device, f"bnb4-{m.quant_type}", lambda: bnb4.code_table(m.quant_type).float()),
        bias=m.bias,
    )
    if m.double_quant:
        layout.dq_code = _on(device, "bnb-dynamic-map", lambda: bnb4.dynamic_map().float())
        layout.dq_nested = m.nested_absmax
        layout.dq_offset = m.offset
    return layout


@register_layout(GGMLLinear)
def _ggml_layout(m: nn.Module) -> WQLayout | None:
    """llama.cpp blocks, converted once into codes, scales and per-group offsets (``ggml_layout.py``)."""
    from quantbench.engine.kernels.ggml_layout import ggml_layout

    return ggml_layout(m)
