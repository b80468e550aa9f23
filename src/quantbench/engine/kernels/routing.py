"""Which kernel runs a linear product: the one routing table of the engine (pure Python, no Triton).

A product is ``x [M, K] @ W.T`` for M tokens. Every caller (``kernels.linear``, the engine's
``LinearOp``, ``QuantLinear.forward`` through ``kernels.dispatch``) asks :func:`route_linear`,
:func:`route_plain` or :func:`route_forward`; the answer depends on M, the layer's format
(``layouts.WQLayout``), the device (``Target``) and ``EngineOptions``. In table order, the first row
that applies wins ("GPU" = a CUDA tensor, not under ``TRITON_INTERPRET=1``):

=============================  ==========  ==========================================================  ==============
product                        M           when                                                        kernel
=============================  ==========  ==========================================================  ==============
quantized layer                >= 64       GPU, ``prompt_kernel`` "prompt_gemm", M <= ``prompt_gemm_    prompt_gemm
                                           max_m``, the kernel has a launch config for the shape; NF4 /
                                           FP4 only with the PTX table decoder (``table_prmt``)
W8A8 layer (SmoothQuant, fp8,  > ``prompt  GPU, method in ``w8a8_gemm`` (default: all three), at least     w8a8_gemm
LLM.int8 without outlier       _gemm_max_  ``act_rows_min_m`` tokens, ``w8a8_gemm_fits``; fp8 on sm_89+
decomposition)                 m``
quantized layer                >= 64       GPU, ``prompt_kernel`` not "wq_matmul", K whole words        slabs (dequant)
W8A8 layer (fp8 by default)    1           method in ``mma_quantizes``, the tensor-core GEMV takes it   mma_gemv (it
                                                                                                       quantizes x)
quantized layer (W8A8: after   1-16        the tensor-core GEMV takes it (below)                        mma_gemv
a separate act_quant launch)
quantized layer (same)         1           ``h2``, GPU sm_80+ (fp8: sm_89+), int4 / int8 / NF4 / FP4 /  gemv_h2
                                           e4m3 codes
quantized layer (same)         any         otherwise (also on the Triton interpreter)                  wq_matmul
plain bf16 / fp16 nn.Linear    <= ``plain  ``plain_mma``, at most ``plain_max_out`` outputs (0: any),   mma_gemv
                               _max_m``    the tensor-core GEMV takes it
plain bf16 / fp16 nn.Linear    any         otherwise                                                   cublas
QuantLinear.forward outside    any         no Triton, not GPU / interpreter, x not 16-bit or not the   reference
the engine                                 compute dtype, autograd on x, no layout, or ``wq_matmul``
                                           has no K step (K a multiple of 2 * codes per word at M = 1,
                                           16 * codes per word above)
QuantLinear.forward            any         otherwise: as a quantized layer above
=============================  ==========  ==========================================================  ==============

"slabs" dequantize L2-sized slabs of the weight in a CUDA graph being captured, and the whole weight (up to
``eager_slab_elems``) in a product launched eagerly (``dequant.dense_matmul``).

Layouts with per-group offsets (llama.cpp's q4_1, q5_1, q4_K, q5_K: ``w = (u - zero) * scale - offset``)
take the same rows except gemv_h2; the routed kernel computes the ``(u - zero) * scale`` part in float32
and ``offsets.subtract_offsets`` the rest (slabs dequantize the whole weight; the tensor-core GEMV only
when its split-K partials are kept, else wq_matmul).

The tensor-core GEMV takes a product when ``mma`` is on, 1 <= M <= 16 (M = 1 only with
``mma_batch1``), on a GPU of sm_80+ (e4m3 codes: sm_89+) with 16-bit activations, a format it decodes
(int4, int8, NF4 / FP4, e4m3 with e4m3-quantized or fp16 activations, plain weights of the activations'
dtype), N a multiple of 16, a warp step that fits the groups and K (``layouts.mma_words_per_lane``),
codes row-major or tiled in its own steps, and 16-byte aligned codes and activation rows.
"""

from __future__ import annotations

import enum
import functools
import os
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from quantbench.engine.kernels.layouts import (
    ACT_BY_NAME,
    ACT_FP8,
    ACT_INT8_TOKEN,
    ACT_LLM_INT8,
    ACT_NONE,
    MODE_FP8,
    MODE_INT,
    MODE_PLAIN,
    MODE_TABLE,
    ROW_TILE_MAX,
    WQLayout,
    mma_words_per_lane,
)
from quantbench.engine.kernels.mma_ptx import D_FP8, D_INT4, D_INT8_F16, D_INT8_F32, D_PLAIN, D_TABLE
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions

PROMPT_MIN_M = 64  # products of this many tokens and more take a prompt kernel (prompt_gemm / slabs)
MMA_MAX_M = 16  # the tensor-core GEMV's most tokens (two m16n8k16 token blocks)
# (mode, bits) of the formats the half2 GEMV decodes (``gemv_h2._PAIRS``)
H2_FORMATS = frozenset({(MODE_INT, 4), (MODE_INT, 8), (MODE_TABLE, 4), (MODE_FP8, 8)})
_HALF = (torch.bfloat16, torch.float16)


class Kernel(enum.Enum):
    PROMPT_GEMM = "prompt_gemm"  # kernels/prompt_gemm.py: fused dequantize-GEMM for prompts
    SLABS = "slabs"  # kernels/dequant.py: dequantized L2 slabs + cuBLAS
    W8A8_GEMM = "w8a8_gemm"  # kernels/w8a8_gemm.py: 8-bit activation codes x 8-bit weight codes
    MMA_GEMV = "mma_gemv"  # kernels/mma_gemv.py: tensor-core GEMV, 1-16 tokens
    GEMV_H2 = "gemv_h2"  # kernels/gemv_h2.py: packed-half2 GEMV, one token
    WQ_MATMUL = "wq_matmul"  # kernels/wq_matmul.py: the generic Triton dequantize-matmul
    CUBLAS = "cublas"  # F.linear on 16-bit weights
    REFERENCE = "reference"  # the module's own (pure-torch) forward


class ActQuant(enum.Enum):
    """Where a W8A8 layer's activations are quantized."""

    NONE = "none"  # weight-only layer (or a plain one)
    LAUNCH = "launch"  # fused.act_quant first; the kernel reads the quantized copy
    IN_GEMV = "in_gemv"  # the tensor-core GEMV quantizes its one token itself


class Route(NamedTuple):
    kernel: Kernel
    act: ActQuant = ActQuant.NONE


class Target(Protocol):
    """What of the device and operands the choice depends on besides M, the layout and the options."""

    device: str  # "cuda", "interpret" (TRITON_INTERPRET=1: Triton kernels on the CPU) or "cpu"
    capability: tuple[int, int]  # CUDA compute capability ((0, 0) off CUDA)
    triton: bool  # Triton is installed
    x_aligned: bool  # x's rows contiguous and on 16-byte boundaries
    codes_aligned: bool  # the codes at the tensor-core GEMV's load width (4 * words per lane bytes)
    prompt_fits: bool  # the fused prompt GEMM has a launch configuration for this product
    table_asm: bool  # NF4 / FP4: the PTX byte-permute decoder is in use on this device
    w8a8_fits: bool  # w8a8_gemm reads this layout (``w8a8_gemm_fits``)


@dataclass(frozen=True)
class Given:
    """A :class:`Target` stated outright (the routing tests; ``Operands`` measures one from tensors)."""

    device: str
    capability: tuple[int, int] = (0, 0)
    triton: bool = True
    x_aligned: bool = True
    codes_aligned: bool = True
    prompt_fits: bool = True
    table_asm: bool = True
    w8a8_fits: bool = True


def interpreting() -> bool:
    """Triton's interpreter runs the kernels (on the CPU): ``TRITON_INTERPRET=1``, Triton's own switch."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


class Operands:
    """The :class:`Target` of ``x`` and ``layout``: each fact measured when the table first asks for it."""

    def __init__(self, x: torch.Tensor, layout: WQLayout | None, options: EngineOptions) -> None:
        self.x, self.layout, self.options = x, layout, options
        self.device = "interpret" if interpreting() else "cuda" if x.is_cuda else "cpu"

    @functools.cached_property
    def capability(self) -> tuple[int, int]:
        if not self.x.is_cuda:
            return (0, 0)
        index = self.x.device.index if self.x.device.index is not None else torch.cuda.current_device()
        return _capability(index)

    @property
    def triton(self) -> bool:
        return triton_available()

    @functools.cached_property
    def x_aligned(self) -> bool:
        x = self.x
        return x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and (x.stride(0) * x.element_size()) % 16 == 0

    @functools.cached_property
    def codes_aligned(self) -> bool:
        align = 4 * mma_words_per_lane(self.layout)
        w32 = self.layout.w32
        return align > 0 and w32.data_ptr() % align == 0 and (w32.stride(0) * 4) % align == 0

    @functools.cached_property
    def prompt_fits(self) -> bool:
        from quantbench.engine.kernels.prompt_gemm import prompt_config

        lay = self.layout
        return bool(
            prompt_config(self.x.shape[0], lay.out_features, lay.in_features, lay.bits, lay.mode, lay.group)
        )

    @functools.cached_property
    def w8a8_fits(self) -> bool:
        return w8a8_gemm_fits(self.layout, self.options)

    @functools.cached_property
    def table_asm(self) -> bool:
        from quantbench.engine.kernels.triton_common import table_decoder

        return bool(table_decoder(self.layout, self.x.device, self.options)["TABLE_ASM"])


# ---------------------------------------------------------------------------------------------
# What each kernel takes


def decoder_kind(layout: WQLayout, dtype: torch.dtype) -> int | None:
    """The tensor-core GEMV's decoder (``mma_ptx.D_*``) for ``layout`` with activations of ``dtype``."""
    if layout.mode == MODE_PLAIN:
        return D_PLAIN if dtype == layout.plain_dtype else None
    if layout.mode == MODE_TABLE and layout.bits == 4:
        return D_TABLE
    if layout.mode == MODE_INT and layout.bits == 4:
        return D_INT4
    if layout.mode == MODE_INT and layout.bits == 8:
        return D_INT8_F32 if dtype == torch.bfloat16 else D_INT8_F16
    if layout.mode == MODE_FP8 and layout.bits == 8:
        return D_FP8
    return None


def _capability_needed(layout: WQLayout) -> tuple[int, int]:
    """e4m3 conversions (cvt.f16x2.e4m3x2, e4m3 tensor-core dots) need sm_89; 16-bit and int8 mma sm_80."""
    return (8, 9) if layout.mode == MODE_FP8 else (8, 0)


def mma_takes(
    m: int, layout: WQLayout, dtype: torch.dtype, target: Target, options: EngineOptions, x_aligned: bool
) -> bool:
    """Whether the tensor-core GEMV runs this product (see the module doc)."""
    if not options.mma or not 1 <= m <= MMA_MAX_M or (m == 1 and not options.mma_batch1):
        return False
    if target.device != "cuda" or dtype not in _HALF:
        return False
    kind = decoder_kind(layout, dtype)
    if kind is None or layout.out_features % 16:
        return False
    if kind == D_FP8 and dtype == torch.bfloat16 and layout.act_quant == ACT_NONE:
        return False  # bf16 activations reach fp16 exactly only when quantized to e4m3 first
    words = mma_words_per_lane(layout)
    if not words or (kind == D_PLAIN and words % 2):
        return False
    if target.capability < _capability_needed(layout):
        return False
    if layout.tile_n and layout.tile_kv != 4 * words:
        return False  # a step would straddle tile columns (codes tiled for another kernel)
    return x_aligned and target.codes_aligned


def h2_takes(m: int, layout: WQLayout, target: Target, options: EngineOptions) -> bool:
    """Whether the packed-half2 GEMV runs this product (one token on a GPU, a format it decodes)."""
    if not options.h2 or m != 1 or target.device != "cuda" or (layout.mode, layout.bits) not in H2_FORMATS:
        return False
    if layout.offsets is not None:  # its output is 16-bit; the offset correction needs a float32 product
        return False
    return target.capability >= _capability_needed(layout)


def w8a8_gemm_fits(layout: WQLayout, options: EngineOptions = DEFAULT_OPTIONS) -> bool:
    """Whether ``w8a8_gemm`` reads this layout: 8-bit codes with one scale per output row and activations
    quantized per token to the same kind (int8: LLM.int8, SmoothQuant; e4m3: fp8), K a multiple of the K
    step and of any code tile and at most one activation-quantization row tile."""
    if layout.bits != 8 or layout.group or layout.offsets is not None:
        return False
    int8 = layout.mode == MODE_INT and layout.signed8 and layout.act_quant in (ACT_LLM_INT8, ACT_INT8_TOKEN)
    if not (int8 or (layout.mode == MODE_FP8 and layout.act_quant == ACT_FP8)):
        return False
    bk, k = options.w8a8_gemm_tiles[2], layout.in_features
    tile_bytes = 4 * layout.tile_kv
    return k % bk == 0 and k <= ROW_TILE_MAX and (not layout.tile_n or bk % tile_bytes == 0)


def w8a8_gemm_takes(m: int, layout: WQLayout, target: Target, options: EngineOptions) -> bool:
    """Whether a W8A8 product of ``m`` (prompt-sized, past the fused prompt GEMM) tokens runs on 8-bit
    tensor cores (``kernels/w8a8_gemm.py``)."""
    if options.act_rows_min_m < 1 or m < options.act_rows_min_m:
        return False
    if layout.act_quant not in {ACT_BY_NAME[name] for name in options.w8a8_gemm}:
        return False
    if layout.act_quant == ACT_LLM_INT8 and layout.threshold > 0:
        return False  # the outlier columns are data: their 16-bit product runs on the slabs
    return target.w8a8_fits and target.capability >= _capability_needed(layout)


def wq_matmul_fits(m: int, k: int, bits: int) -> bool:
    """Whether ``wq_matmul`` has a K step for this product (``wq_matmul.pick_config`` / ``fit_bk``: a
    power-of-two step of at least 2 (one token) or 16 (more) columns per code slot dividing K)."""
    return k % ((2 if m == 1 else 16) * (32 // bits)) == 0


# ---------------------------------------------------------------------------------------------
# The table


def route_linear(
    m: int, layout: WQLayout, dtype: torch.dtype, target: Target, options: EngineOptions = DEFAULT_OPTIONS
) -> Route:
    """The kernel of a quantized layer's product of ``m`` tokens with ``dtype`` activations."""
    vals = 32 // layout.bits
    gpu = target.device == "cuda"
    if gpu and options.prompt_kernel != "wq_matmul" and m >= PROMPT_MIN_M and layout.in_features % vals == 0:
        act = ActQuant.NONE if layout.act_quant == ACT_NONE else ActQuant.LAUNCH
        fused = (
            options.prompt_kernel == "prompt_gemm" and m <= options.prompt_gemm_max_m and target.prompt_fits
        )
        if fused and not (layout.mode == MODE_TABLE and not target.table_asm):
            return Route(Kernel.PROMPT_GEMM, act)
        if w8a8_gemm_takes(m, layout, target, options):
            return Route(Kernel.W8A8_GEMM, act)
        return Route(Kernel.SLABS, act)
    x_aligned = target.x_aligned
    act = ActQuant.NONE
    if layout.act_quant != ACT_NONE:
        quantizes = {ACT_BY_NAME[name] for name in options.mma_quantizes}
        if (
            m == 1
            and layout.act_quant in quantizes
            and mma_takes(m, layout, dtype, target, options, x_aligned)
        ):
            return Route(Kernel.MMA_GEMV, ActQuant.IN_GEMV)
        # the kernel reads act_quant's output: a fresh contiguous [M, K] tensor, aligned when its rows are
        act, x_aligned = ActQuant.LAUNCH, (layout.in_features * dtype.itemsize) % 16 == 0
    if mma_takes(m, layout, dtype, target, options, x_aligned):
        return Route(Kernel.MMA_GEMV, act)
    if h2_takes(m, layout, target, options):
        return Route(Kernel.GEMV_H2, act)
    return Route(Kernel.WQ_MATMUL, act)


def route_plain(
    m: int,
    layout: WQLayout | None,
    dtype: torch.dtype,
    target: Target,
    options: EngineOptions = DEFAULT_OPTIONS,
) -> Kernel:
    """The kernel of a plain 16-bit linear's product (``layout``: ``layouts.plain_layout_for``, or None)."""
    if layout is None or not options.plain_mma or m > options.plain_max_m:
        return Kernel.CUBLAS
    if options.plain_max_out and layout.out_features > options.plain_max_out:
        return Kernel.CUBLAS
    return (
        Kernel.MMA_GEMV if mma_takes(m, layout, dtype, target, options, target.x_aligned) else Kernel.CUBLAS
    )


def route_forward(
    m: int,
    layout: WQLayout | None,
    dtype: torch.dtype,
    compute_dtype: torch.dtype,
    autograd: bool,
    target: Target,
    options: EngineOptions = DEFAULT_OPTIONS,
) -> Route:
    """The kernel of ``QuantLinear.forward`` on ``m`` rows outside the engine (``kernels.dispatch``):
    ``autograd`` when x needs a gradient (the kernels have no backward: QLoRA training takes the
    reference path)."""
    if not target.triton or target.device == "cpu" or dtype not in _HALF or autograd:
        return Route(Kernel.REFERENCE)
    if compute_dtype != dtype or layout is None or not wq_matmul_fits(m, layout.in_features, layout.bits):
        return Route(Kernel.REFERENCE)
    return route_linear(m, layout, dtype, target, options)


# ---------------------------------------------------------------------------------------------
# On tensors


def route_for(x: torch.Tensor, layout: WQLayout, options: EngineOptions = DEFAULT_OPTIONS) -> Route:
    """:func:`route_linear` of the product ``x [M, K]`` with a quantized ``layout``."""
    return route_linear(x.shape[0], layout, x.dtype, Operands(x, layout, options), options)


def mma_supported(x: torch.Tensor, layout: WQLayout, options: EngineOptions = DEFAULT_OPTIONS) -> bool:
    """Whether the tensor-core GEMV can run ``x [M, K]`` with ``layout`` (whichever route is chosen)."""
    target = Operands(x, layout, options)
    return mma_takes(x.shape[0], layout, x.dtype, target, options, target.x_aligned)


def h2_supported(x: torch.Tensor, layout: WQLayout, options: EngineOptions = DEFAULT_OPTIONS) -> bool:
    """Whether the packed-half2 GEMV can run ``x [1, K]`` with ``layout``."""
    return h2_takes(x.shape[0], layout, Operands(x, layout, options), options)
