"""The engine's routing table (``engine/kernels/routing.py``) on representative cases: pure Python on the
CPU, the device stated outright (``Given``) instead of measured, so every GPU decision is checked here."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from quantbench import parse_spec
from quantbench.engine import EngineOptions
from quantbench.engine.kernels.layouts import ACT_NONE, layout_for, plain_layout_for, tile_buffers
from quantbench.engine.kernels.routing import (
    ActQuant,
    Given,
    Kernel,
    Operands,
    Route,
    route_for,
    route_forward,
    route_linear,
    route_plain,
    wq_matmul_fits,
)
from quantbench.quant import METHODS

H100 = Given("cuda", (9, 0))
A100 = Given("cuda", (8, 0))
DEFAULT = EngineOptions()
BF16, FP16 = torch.bfloat16, torch.float16


def _layout(spec: str, n: int = 64, k: int = 256, tile: tuple[int, int] | None = None):
    cfg = parse_spec(spec)
    module = METHODS[cfg.method].linear_cls.from_linear(torch.nn.Linear(k, n, bias=False), cfg)
    if tile:
        module.store_tiled(tile_buffers(module, layout_for(module), *tile))
    return layout_for(module)


@pytest.fixture(scope="module")
def int4():
    return _layout("int4:group=128")


def _kernels(layout, ms, target=H100, options=DEFAULT, dtype=BF16) -> list[Kernel]:
    return [route_linear(m, layout, dtype, target, options).kernel for m in ms]


def test_weight_only_by_tokens(int4) -> None:
    """1-16 tokens: the tensor-core GEMV; 17-63: wq_matmul; 64-256: the fused prompt GEMM; beyond: slabs."""
    got = _kernels(int4, [1, 8, 16, 17, 63, 64, 256, 257])
    M, W, P, S = Kernel.MMA_GEMV, Kernel.WQ_MATMUL, Kernel.PROMPT_GEMM, Kernel.SLABS
    assert got == [M, M, M, W, W, P, P, S]
    assert route_linear(1, int4, BF16, H100, DEFAULT) == Route(Kernel.MMA_GEMV, ActQuant.NONE)


@pytest.mark.parametrize(
    "fields,ms,want",
    [
        ({"mma_batch1": False}, [1, 2], [Kernel.GEMV_H2, Kernel.MMA_GEMV]),
        ({"mma": False}, [1, 8], [Kernel.GEMV_H2, Kernel.WQ_MATMUL]),
        ({"mma": False, "h2": False}, [1], [Kernel.WQ_MATMUL]),
        ({"prompt_kernel": "slabs"}, [64, 128], [Kernel.SLABS, Kernel.SLABS]),
        ({"prompt_kernel": "wq_matmul"}, [128, 1024], [Kernel.WQ_MATMUL, Kernel.WQ_MATMUL]),
        ({"prompt_gemm_max_m": 128}, [128, 129], [Kernel.PROMPT_GEMM, Kernel.SLABS]),
    ],
)
def test_options_steer_the_choice(int4, fields: dict, ms: list[int], want: list[Kernel]) -> None:
    assert _kernels(int4, ms, options=EngineOptions(**fields)) == want


def test_device_facts(int4) -> None:
    """Under the Triton interpreter every product is wq_matmul; a prompt shape without a fused-GEMM
    configuration takes the slabs; unaligned activations keep one token off the tensor-core GEMV."""
    interp = Given("interpret")
    assert _kernels(int4, [1, 8, 128], target=interp) == [Kernel.WQ_MATMUL] * 3
    assert _kernels(int4, [128], target=Given("cuda", (9, 0), prompt_fits=False)) == [Kernel.SLABS]
    assert _kernels(int4, [1], target=Given("cuda", (9, 0), x_aligned=False)) == [Kernel.GEMV_H2]
    assert _kernels(int4, [1, 4], target=Given("cuda", (7, 5))) == [Kernel.WQ_MATMUL, Kernel.WQ_MATMUL]


def test_nf4_prompts_need_the_permute_decoder() -> None:
    nf4 = _layout("nf4:block=64")
    assert _kernels(nf4, [1, 128]) == [Kernel.MMA_GEMV, Kernel.PROMPT_GEMM]
    assert _kernels(nf4, [128], target=Given("cuda", (9, 0), table_asm=False)) == [Kernel.SLABS]


def test_codes_tiled_for_another_kernel() -> None:
    """int8 codes in the half2 GEMV's tiles of 32 words per row: a tensor-core GEMV step (16 words) would
    straddle them; NF4 in its 8-word tiles holds whole steps, so it stays on tensor cores."""
    int8 = _layout("int8", tile=(32, 32))
    assert int8.tile_n == 32
    assert _kernels(int8, [1, 2]) == [Kernel.GEMV_H2, Kernel.WQ_MATMUL]
    nf4 = _layout("nf4:block=64", n=128, tile=(128, 8))
    assert _kernels(nf4, [1, 2]) == [Kernel.MMA_GEMV, Kernel.MMA_GEMV]


def test_w8a8_activation_quantization() -> None:
    """fp8 quantizes its one token inside the tensor-core GEMV (e4m3 needs sm_89: on an A100 neither GEMV
    takes it); LLM.int8 launches act_quant first unless ``mma_quantizes`` names it; prompts quantize first."""
    fp8 = _layout("fp8")
    assert route_linear(1, fp8, BF16, H100, DEFAULT) == Route(Kernel.MMA_GEMV, ActQuant.IN_GEMV)
    assert route_linear(8, fp8, BF16, H100, DEFAULT) == Route(Kernel.MMA_GEMV, ActQuant.LAUNCH)
    assert route_linear(1, fp8, BF16, A100, DEFAULT) == Route(Kernel.WQ_MATMUL, ActQuant.LAUNCH)
    none = EngineOptions(mma_quantizes=frozenset())
    assert route_linear(1, fp8, BF16, H100, none) == Route(Kernel.MMA_GEMV, ActQuant.LAUNCH)
    assert route_linear(128, fp8, BF16, H100, DEFAULT) == Route(Kernel.PROMPT_GEMM, ActQuant.LAUNCH)
    llm = _layout("llm.int8")
    assert route_linear(1, llm, BF16, H100, DEFAULT) == Route(Kernel.MMA_GEMV, ActQuant.LAUNCH)
    every = EngineOptions(mma_quantizes=frozenset({"llm.int8", "fp8", "smoothquant"}))
    assert route_linear(1, llm, BF16, H100, every) == Route(Kernel.MMA_GEMV, ActQuant.IN_GEMV)
    # the kernel reads act_quant's own (aligned) copy, so unaligned input rows do not matter then
    unaligned = Given("cuda", (9, 0), x_aligned=False)
    assert route_linear(1, llm, BF16, unaligned, DEFAULT) == Route(Kernel.MMA_GEMV, ActQuant.LAUNCH)
    assert route_linear(1, llm, BF16, unaligned, every) == Route(Kernel.MMA_GEMV, ActQuant.LAUNCH)
    assert route_linear(1, llm, BF16, Given("interpret"), DEFAULT) == Route(Kernel.WQ_MATMUL, ActQuant.LAUNCH)


def test_w8a8_products_on_8bit_tensor_cores() -> None:
    """``w8a8_gemm`` (by default every W8A8 method) takes SmoothQuant, fp8 and LLM.int8-without-outliers
    products of ``act_rows_min_m`` tokens and more past the fused prompt GEMM; fp8 only on sm_89+ (e4m3
    tensor cores); LLM.int8 with its threshold, the methods the option leaves out and weight-only formats
    run the slabs."""
    on = DEFAULT
    off = EngineOptions(w8a8_gemm=frozenset())
    llm = _layout("llm.int8:compute=bf16,threshold=0", k=512)
    sq, fp8 = _layout("smoothquant", k=512), _layout("fp8", k=512)
    for layout in (llm, sq, fp8):
        assert _kernels(layout, [512, 4096], options=off) == [Kernel.SLABS] * 2
        assert _kernels(layout, [256, 511, 512, 4096], options=on) == [
            Kernel.PROMPT_GEMM, Kernel.SLABS, Kernel.W8A8_GEMM, Kernel.W8A8_GEMM
        ]  # fmt: skip
        assert route_linear(512, layout, BF16, H100, on).act is ActQuant.LAUNCH
        assert _kernels(layout, [512], target=Given("cuda", (9, 0), w8a8_fits=False), options=on) == [
            Kernel.SLABS
        ]
        assert _kernels(layout, [1024], options=dataclasses.replace(on, act_rows_min_m=2048)) == [
            Kernel.SLABS
        ]
    assert _kernels(fp8, [1024], target=A100, options=on) == [Kernel.SLABS]
    assert _kernels(sq, [1024], target=A100, options=on) == [Kernel.W8A8_GEMM]
    only_fp8 = EngineOptions(w8a8_gemm=frozenset({"fp8"}))
    assert [_kernels(layout, [1024], options=only_fp8)[0] for layout in (llm, sq, fp8)] == [
        Kernel.SLABS, Kernel.SLABS, Kernel.W8A8_GEMM
    ]  # fmt: skip
    outliers = _layout("llm.int8:compute=bf16", k=512)
    assert outliers.threshold == 6.0 and _kernels(outliers, [512, 4096], options=on) == [Kernel.SLABS] * 2
    # the measured fact: only 8-bit codes with per-row scales and activations of the same kind, K whole steps
    from quantbench.engine.kernels.routing import w8a8_gemm_fits

    assert w8a8_gemm_fits(llm, on) and w8a8_gemm_fits(sq, on) and w8a8_gemm_fits(fp8, on)
    assert not any(w8a8_gemm_fits(_layout(spec, k=512), on) for spec in ("int8", "int4:group=128"))
    assert not w8a8_gemm_fits(_layout("smoothquant", k=320), on)  # K not a multiple of the 128-column step
    tiled = _layout("llm.int8:compute=bf16,threshold=0", k=512, tile=(16, 16))
    assert tiled.tile_n == 16 and w8a8_gemm_fits(tiled, on)


def test_fp8_weight_only_needs_fp16_activations_on_tensor_cores() -> None:
    fp8 = dataclasses.replace(_layout("fp8"), act_quant=ACT_NONE)  # e4m3 weights, 16-bit activations
    assert route_linear(1, fp8, BF16, H100, DEFAULT).kernel is Kernel.GEMV_H2
    assert route_linear(1, fp8, FP16, H100, DEFAULT).kernel is Kernel.MMA_GEMV


def test_plain_linears() -> None:
    """bf16 / fp16 nn.Linear: the tensor-core GEMV at one token for at most 8192 outputs, else cuBLAS."""
    small = plain_layout_for(torch.nn.Linear(256, 64, bias=False, dtype=BF16))
    wide = plain_layout_for(torch.nn.Linear(32, 8208, bias=False, dtype=BF16))
    assert [route_plain(m, small, BF16, H100) for m in (1, 2)] == [Kernel.MMA_GEMV, Kernel.CUBLAS]
    assert route_plain(1, wide, BF16, H100) is Kernel.CUBLAS
    assert route_plain(1, wide, BF16, H100, EngineOptions(plain_max_out=0)) is Kernel.MMA_GEMV
    assert route_plain(4, small, BF16, H100, EngineOptions(plain_max_m=16)) is Kernel.MMA_GEMV
    assert route_plain(1, small, BF16, H100, EngineOptions(plain_mma=False)) is Kernel.CUBLAS
    assert route_plain(1, small, FP16, H100) is Kernel.CUBLAS  # activations of another dtype
    assert route_plain(1, None, BF16, H100) is Kernel.CUBLAS  # no layout (e.g. fp32 weights)


def test_module_forward_outside_the_engine(int4) -> None:
    """``QuantLinear.forward``'s hook: the reference forward unless Triton runs 16-bit activations of the
    layer's compute dtype without autograd and wq_matmul has a K step; otherwise the table above."""
    fwd = route_forward
    assert fwd(1, int4, BF16, BF16, False, H100) == Route(Kernel.MMA_GEMV)
    assert fwd(128, int4, BF16, BF16, False, H100) == Route(Kernel.PROMPT_GEMM)
    reference = Route(Kernel.REFERENCE)
    assert fwd(1, int4, BF16, BF16, False, Given("cpu")) == reference
    assert fwd(1, int4, BF16, BF16, False, Given("cuda", (9, 0), triton=False)) == reference
    assert fwd(1, int4, torch.float32, torch.float32, False, H100) == reference
    assert fwd(1, int4, FP16, BF16, False, H100) == reference
    assert fwd(1, int4, BF16, BF16, True, H100) == reference
    assert fwd(1, None, BF16, BF16, False, H100) == reference
    assert fwd(1, int4, BF16, BF16, False, Given("interpret")) == Route(Kernel.WQ_MATMUL)
    narrow = _layout("int4:group=16", k=144)  # 144 columns: a K step at one token, none above
    assert fwd(1, narrow, BF16, BF16, False, Given("interpret")) == Route(Kernel.WQ_MATMUL)
    assert fwd(2, narrow, BF16, BF16, False, Given("interpret")) == reference


def test_measured_facts_on_cpu_tensors(int4) -> None:
    x = torch.randn(3, 256, dtype=BF16)
    facts = Operands(x, int4, DEFAULT)
    assert facts.device == "cpu" and facts.capability == (0, 0) and facts.x_aligned and facts.codes_aligned
    assert not Operands(torch.randn(3, 257, dtype=BF16)[:, 1:], int4, DEFAULT).x_aligned
    assert route_for(x, int4) == Route(Kernel.WQ_MATMUL)  # off the GPU: no GPU-only kernel


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (the kernels' configs)")
def test_table_matches_the_kernels_own_limits() -> None:
    """``wq_matmul_fits`` is ``wq_matmul.pick_config`` finding a configuration; ``H2_FORMATS`` are the half2
    GEMV's formats."""
    from quantbench.engine.kernels.gemv_h2 import _PAIRS
    from quantbench.engine.kernels.routing import H2_FORMATS
    from quantbench.engine.kernels.wq_matmul import pick_config

    assert set(_PAIRS) == H2_FORMATS
    for bits in (4, 8):
        for m in (1, 2, 17, 300):
            for k in (8, 16, 24, 40, 64, 72, 96, 128, 136, 144, 192, 256, 4096, 4104, 14336):
                assert wq_matmul_fits(m, k, bits) == bool(pick_config(m, 64, k, bits, 0)), (m, k, bits)


def test_options_reject_values_the_engine_cannot_run() -> None:
    from quantbench.engine import EngineOptionsError

    for fields in (
        {"prompt_kernel": "fused"},
        {"mma_quantizes": frozenset({"int4"})},
        {"mma_x_carry": frozenset({"nf4"})},
        {"mma_lut_copies": 6},
        {"attn_block": 96},
        {"mma_depth_4bit": 3},
        {"act_tiles_prompt": (256, 16, 16)},
        {"w8a8_gemm_tiles": (128, 128, 96, 8, 8, 3)},
        {"w8a8_gemm_tiles": (8, 128, 128, 8, 8, 3)},
        {"w8a8_gemm_tiles": (128,)},  # the one-line option error, before anything reads its K step
        {"w8a8_gemm": frozenset({"int8"})},
        {"w8a8_gemm": True},
        {"w8a8_fp8_mma": "fp8"},
        {"w8a8_fp8_mma": "bf16"},
    ):
        with pytest.raises(EngineOptionsError):
            EngineOptions(**fields)
    assert EngineOptions(mma_quantizes={"llm.int8"}).mma_quantizes == frozenset({"llm.int8"})  # sets frozen
    for kind in ("fp16", "e4m3"):
        assert EngineOptions(w8a8_fp8_mma=kind).w8a8_fp8_mma == kind


def test_engine_ab_variants_are_options() -> None:
    """Every A/B variant of ``benchmarks/engine_ab.py`` is a valid EngineOptions value (no patched globals)."""
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "engine_ab.py"
    spec = importlib.util.spec_from_file_location("engine_ab", path)
    engine_ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(engine_ab)
    for name in [*engine_ab.VARIANTS, "cfg:num_warps=4,split=2", "mcfg:NW=8,DEPTH=2"]:
        assert isinstance(engine_ab.variant_options(name), EngineOptions), name
    assert engine_ab.variant_options("base") == EngineOptions()
    edit = engine_ab.variant_options("cfg:num_warps=4,split=2").h2_config_edit
    row_major = dataclasses.replace(_layout("int8"), tile_n=0)
    chosen = {"num_warps": 2, "SPLIT_K": 4, "BN": 32}
    assert edit(chosen, row_major) == {"num_warps": 4, "SPLIT_K": 8, "BN": 32}
