"""``EngineOptions``: how the CUDA engine runs its products and fused ops, as one value.

``Engine(model, options=...)`` / ``EngineModel(model, options=...)`` pass it down to every kernel choice
(``engine/kernels/routing.py``), to the tile-major storage of the weights (``layouts.tiling_for``) and to
each kernel's launch. The defaults are the engine's tuned behaviour; the other values exist so that
benchmarks can time the alternatives (``benchmarks/engine_ab.py`` builds one per variant). Every field
changes speed only: the result is the same function, up to the fp32 summation order of a split product,
except ``mma_step_asm`` (a diagnostic hook, see there).

Nothing here imports Triton.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from quantbench.errors import QuantbenchError

# W8A8 methods (``mma_quantizes``: one token quantized inside the GEMV; ``w8a8_gemm``: 8-bit products)
ACT_QUANT_NAMES = ("llm.int8", "fp8", "smoothquant")
# Tensor-core GEMV decoders (``mma_x_carry``): int4 codes, NF4 / FP4 tables, int8 codes, e4m3 codes, and
# plain 16-bit weights
DECODER_NAMES = ("int4", "table", "int8", "fp8", "plain")
PROMPT_KERNELS = ("prompt_gemm", "slabs", "wq_matmul")
# how fp8 products of many tokens multiply their codes (``EngineOptions.w8a8_fp8_mma``)
FP8_MMA_KINDS = ("fp16", "e4m3")


class EngineOptionsError(QuantbenchError, ValueError):
    """An ``EngineOptions`` field has a value the engine cannot run."""


@dataclass(frozen=True)
class EngineOptions:
    """Kernel choices and tuning of the CUDA engine (see the module doc). Fields, by what they steer:"""

    # ---- weight storage ----
    tile: bool = True
    """Store quantized codes tile-major in the steps of the batch-1 GEMV (``layouts.gemv_tile``); off:
    row-major, as checkpoints hold them."""

    # ---- which kernel runs a quantized product (``kernels/routing.py``) ----
    mma: bool = True
    """The tensor-core GEMV (``mma_gemv``) for 1-16 tokens; off: the half2 GEMV / ``wq_matmul``."""
    mma_batch1: bool = True
    """The tensor-core GEMV also at one token (and its tiles); off: one token keeps the half2 GEMV."""
    mma_quantizes: frozenset[str] = frozenset({"fp8"})
    """W8A8 methods (of ``ACT_QUANT_NAMES``) whose one token the tensor-core GEMV quantizes itself instead
    of a separate activation-quantization launch. LLM.int8's per-pair rounding and outlier test, redone by
    every row tile, cost more than the launch they save, so only e4m3 by default."""
    h2: bool = True
    """The packed-half2 GEMV (``gemv_h2``) for one token where the tensor-core GEMV does not run; off:
    ``wq_matmul``'s fp32 path."""
    prompt_kernel: str = "prompt_gemm"
    """Products of ``routing.PROMPT_MIN_M`` tokens and more: "prompt_gemm" (fused dequantize-GEMM up to
    ``prompt_gemm_max_m`` tokens, dequantized L2 slabs + cuBLAS above), "slabs" (always the slabs) or
    "wq_matmul" (the generic Triton matmul)."""
    prompt_gemm_max_m: int = 256
    """The most tokens the fused prompt GEMM takes: it decodes each weight tile once per 128 tokens, the
    slabs decode each weight once, so cuBLAS on slabs wins for long prompts."""
    plain_mma: bool = True
    """Plain bf16 / fp16 linears through the tensor-core GEMV (it starts early under programmatic dependent
    launch and leaves split-K partials to the next kernel) where ``plain_max_m`` / ``plain_max_out``
    allow; off: cuBLAS."""
    plain_max_m: int = 1
    """The most tokens a plain linear runs through the tensor-core GEMV."""
    plain_max_out: int = 8192
    """The most outputs of a plain linear run through the tensor-core GEMV (0: any)."""

    # ---- tensor-core GEMV (``mma_gemv``) ----
    partials: bool = True
    """Decode-step GEMVs leave their split-K partials to the next kernel (``kernels/partials.py``); off:
    each sums its own (a fenced counter elects the last split)."""
    mma_x_carry: frozenset[str] = frozenset({"int4", "table", "fp8", "plain"})
    """Decoders (of ``DECODER_NAMES``) whose steps load their activations an iteration ahead, outside the
    step's asm (8-bit codes' 32-word steps already overlap their loads)."""
    mma_lut_copies: int = 16
    """NF4 / FP4: copies of the shared-memory table of code-pair values (a multiple of 4; 0: decode with
    byte permutes only)."""
    mma_lut_permute: int = 1
    """NF4 / FP4 with the table: code words per step decoded by byte permutes anyway (the ALU against the
    L1 data pipe)."""
    mma_table_warps: int = 4
    """Warps per program for NF4 / FP4 codes."""
    mma_two_groups: bool = True
    """NF4 / FP4 in groups of 32 / 64 at 1-8 tokens: a warp step takes two consecutive groups."""
    mma_depth_4bit: int = 1
    """Steps of 4-bit codes in flight per warp, 1 or 2 (8- and 16-bit codes: 2)."""
    mma_config_edit: Callable[[dict, object], dict] | None = None
    """Benchmarks: ``edit(config, layout)`` returns the launch config (``NW``, ``SPLIT_K``, ``DEPTH``) to
    use instead of the chosen one."""
    mma_step_asm: Callable[..., str] | None = None
    """Diagnostics: a replacement for ``mma_ptx.step_asm`` (same arguments). The only field that can change
    results: ``benchmarks/engine_ab.py``'s ``loadonly`` step loads and multiplies nothing."""

    # ---- half2 GEMV (``gemv_h2``) ----
    h2_config_edit: Callable[[dict, object], dict] | None = None
    """Benchmarks: ``edit(config, layout)`` returns the launch config to use instead of the chosen one."""

    # ---- NF4 / FP4 in ``wq_matmul`` and the prompt GEMM ----
    table_prmt: bool = True
    """Decode NF4 / FP4 codes by PTX byte permutes; off: L1 table lookups (the prompt GEMM then leaves
    these formats to the slabs: the lookup decode does not compile for it on sm_90)."""

    # ---- prompt slabs (``dequant.dense_matmul``) ----
    slab_overlap: bool = True
    """Dequantize the next slab on a side stream while cuBLAS multiplies this one."""
    slab_fold_scales: bool = True
    """Apply per-row weight scales as a slab is dequantized and W8A8's per-token factors as the activations
    are quantized (each rounded to the model dtype), so cuBLAS's product plus bias is the result; off:
    bf16 products of the exact codes, scaled in one more pass over the output."""
    slab_elems: int = 12 << 20
    """Weights per slab (12 Mi bf16 = 24 MiB: stays in an H100's 50 MB L2 next to the codes)."""
    eager_slab_elems: int = 1 << 28
    """Weights per slab of a product launched eagerly (not being captured into a CUDA graph: evaluation's
    and calibration's forwards): the whole weight up to this many, one dequantize launch and one cuBLAS
    product per layer. Launching a kernel pair per L2 slab from Python leaves the GPU idle there; writing
    the whole 16-bit weight out costs less. 0: L2 slabs for every product."""

    # ---- W8A8 products on 8-bit tensor cores (``kernels/w8a8_gemm.py``) ----
    w8a8_gemm: frozenset[str] = frozenset(ACT_QUANT_NAMES)
    """W8A8 methods (of ``ACT_QUANT_NAMES``) whose products of more than ``prompt_gemm_max_m`` tokens (and at
    least ``act_rows_min_m``) multiply 8-bit activation codes by the 8-bit weight codes, as the methods
    define them (SmoothQuant, and LLM.int8 without outlier decomposition: int8 with int32 sums; fp8: e4m3
    with fp32 sums, sm_89+), instead of dequantized slabs + cuBLAS. LLM.int8 with a threshold always runs
    the slabs (``routing.w8a8_gemm_takes``)."""
    w8a8_gemm_tiles: tuple[int, int, int, int, int, int] = (128, 128, 128, 8, 8, 3)
    """Tokens, outputs and K per step of a program, token tiles per weight tile's group, warps, stages."""
    w8a8_fp8_mma: str = "e4m3"
    """fp8 products: "e4m3": on e4m3 tensor cores, as fp8 deployments run them; on Hopper their sums keep
    about 14 bits, not fp32's 24 (outside fp32's error bound, also when added into fp32 after every MMA
    instruction). "fp16": the codes widened to fp16 (exactly) on 16-bit tensor cores, exact products summed
    in fp32 as the reference sums them, at less than half the speed."""

    # ---- launches ----
    pdl: bool = True
    """Programmatic dependent launch of the decode-step kernels (``kernels/pdl.py``, Hopper and newer)."""

    # ---- decode attention (``fused.decode_attention``) ----
    attn_split: bool = True
    """Split long caches among programs (one split per ``attn_split_min`` positions)."""
    attn_split_min: int = 512
    """Cached positions per split of decode attention."""
    attn_block: int = 256
    """The most positions per block of decode attention (a split of up to this many is one block, all of
    it loaded before the wait on the previous kernel)."""
    attn_warps: int = 8
    """Warps per program for blocks of 256 positions (4 below)."""

    # ---- extend attention (evaluation, prefix and generation batches: ``EngineModel.extend``) ----
    extend_triton: bool = True
    """Attention of extend forwards in one Triton kernel that rotates the queries, reads the past's keys
    where they are stored and writes the o-projection's layout (``kernels/extend_attention.py``); off: the
    reference ops (RoPE in torch, the past gathered and concatenated, SDPA under an additive mask)."""

    # ---- W8A8 activation quantization (``fused.act_quant``) ----
    act_tiles_decode: tuple[int, int, int, int] = (1024, 64, 16, 1024)
    """Up to 64 tokens: columns, tokens and tokens per load of a statistics program; columns per apply
    program."""
    act_tiles_prompt: tuple[int, int, int, int] = (256, 16, 16, 1024)
    """More tokens (smaller statistics programs spread over the SMs)."""
    act_tiles_outlier: tuple[int, int, int, int] = (64, 256, 256, 1024)
    """LLM.int8 prompts: every token of a narrow column chunk in one load (no column-maxima pass)."""
    act_producer_colmax: bool = True
    """LLM.int8 prompts on whole-row programs: the kernel writing a product's input (RMSNorm, SiLU-gate) also
    records its outlier columns (``fused.outlier_columns``), in place of a column-maxima pass over it."""
    act_prompt_pdl: bool = False
    """Launch prompt-sized activation quantization with programmatic dependent launch."""
    act_rows_min_m: int = 512
    """From this many tokens (0: never): one program per token holding its whole row (LLM.int8: after one
    pass of column maxima merged over every token) instead of the statistics and apply programs, one read
    of the activations fewer. Measured faster at 1024 and 4096 tokens; fewer keep the tuned programs."""

    # ---- generation (``Engine``) ----
    greedy_pick: bool = True
    """The greedy step's argmax and token writes as one Triton kernel (else five torch ops)."""

    def __post_init__(self) -> None:
        if self.prompt_kernel not in PROMPT_KERNELS:
            raise EngineOptionsError(
                f"prompt_kernel must be one of {', '.join(PROMPT_KERNELS)}, not {self.prompt_kernel!r}"
            )
        for name, allowed in (
            ("mma_quantizes", ACT_QUANT_NAMES),
            ("w8a8_gemm", ACT_QUANT_NAMES),
            ("mma_x_carry", DECODER_NAMES),
        ):
            value = getattr(self, name)
            if not isinstance(value, (set, frozenset, tuple, list)) or not all(isinstance(v, str) for v in value):
                raise EngineOptionsError(f"{name} takes a set of names from {', '.join(allowed)}, not {value!r}")
            unknown = set(value) - set(allowed)
            if unknown:
                raise EngineOptionsError(
                    f"{name}: unknown {', '.join(sorted(unknown))} (known: {', '.join(allowed)})"
                )
            object.__setattr__(self, name, frozenset(getattr(self, name)))
        if self.mma_lut_copies < 0 or self.mma_lut_copies % 4:
            raise EngineOptionsError(f"mma_lut_copies takes 0 or a multiple of 4, not {self.mma_lut_copies}")
        for name in ("attn_block", "attn_warps", "mma_table_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise EngineOptionsError(f"{name} must be a power of two, not {value}")
        if self.attn_block < 64:
            raise EngineOptionsError(f"attn_block must be at least 64, not {self.attn_block}")
        for name in ("act_tiles_decode", "act_tiles_prompt", "act_tiles_outlier"):
            tiles = tuple(getattr(self, name))
            if len(tiles) != 4 or any(t < 1 for t in tiles):
                raise EngineOptionsError(f"{name} takes four positive sizes, not {tiles}")
            object.__setattr__(self, name, tiles)
        tiles = tuple(self.w8a8_gemm_tiles)
        if (
            len(tiles) != 6
            or min(tiles) < 1
            or min(tiles[:2]) < 16
            or tiles[2] % 32
            or any(t & (t - 1) for t in tiles[:3])
        ):
            raise EngineOptionsError(
                f"w8a8_gemm_tiles takes six positive sizes, the first three powers of two (tokens and outputs "
                f"at least 16, K per step a multiple of 32), not {tiles}"
            )
        object.__setattr__(self, "w8a8_gemm_tiles", tiles)
        if self.w8a8_fp8_mma not in FP8_MMA_KINDS:
            raise EngineOptionsError(
                f"w8a8_fp8_mma must be one of {', '.join(FP8_MMA_KINDS)}, not {self.w8a8_fp8_mma!r}"
            )
        if self.mma_depth_4bit not in (1, 2):
            raise EngineOptionsError(f"mma_depth_4bit takes 1 or 2, not {self.mma_depth_4bit}")
        positive = ("prompt_gemm_max_m", "plain_max_m", "slab_elems", "attn_split_min")
        for name in positive:
            if getattr(self, name) < 1:
                raise EngineOptionsError(f"{name} must be positive, not {getattr(self, name)}")
        if min(self.plain_max_out, self.mma_lut_permute, self.eager_slab_elems, self.act_rows_min_m) < 0:
            raise EngineOptionsError(
                "plain_max_out, mma_lut_permute, eager_slab_elems and act_rows_min_m must not be negative"
            )


DEFAULT_OPTIONS = EngineOptions()
