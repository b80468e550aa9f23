"""Triton kernels against the pure-torch reference.

CUDA tests (marked ``cuda``) run every kernel at real sizes against the module's ``dequantize()`` +
matmul in float64 (or, for W8A8 methods, the module's own forward on CPU, which holds the activation
quantization), on fresh random inputs with a NaN-poisoned output. Relative error
``||out - ref|| / ||ref||`` bounds:

* weight-only kernels (bf16 activations and output): 1e-2. The weights are dequantized exactly as
  ``dequantize()`` rounds them (tensor-core path) or kept in fp32 (M = 1 path); what is left is the bf16
  rounding of the output (~2e-3 relative) and the fp32 accumulation order.
* W8A8 (LLM.int8, fp8, SmoothQuant) against the module's own math: 2e-2 (same quantized activations up
  to an exact tie; fp32 instead of int32 / cuBLAS accumulation).
* fused decode ops (RMSNorm, SiLU-gate, RoPE + cache, attention): 1e-2 against the torch references.

Without CUDA, the interpreter tests run the same kernels on CPU through ``TRITON_INTERPRET=1`` at small
sizes when Triton is installed (fp16: the interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Interpreter mode is fixed when a kernel module is imported, and TRITON_INTERPRET=1 routes every CPU
# forward through the kernels: so the interpreter tests run in their own process (see the last test),
# never by setting the variable in this one.
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

from quantbench import parse_spec  # noqa: E402
from quantbench.engine.options import ACT_QUANT_NAMES, EngineOptions  # noqa: E402
from quantbench.quant import METHODS  # noqa: E402

interp = pytest.mark.skipif(
    CUDA or not HAS_TRITON or not IN_INTERPRETER, reason="runs inside test_interpreter_tests_in_own_process"
)

WEIGHT_ONLY = [
    "int4:group=128",
    "int4:group=32,asym",
    "int4:group=-1",
    "int8",
    "int8:asym",
    "int8:group=64",
    "nf4:block=64",
    "nf4:block=64,dq=1",
    "fp4:block=128",
    "nf4:block=256,dq=1",
]
W8A8 = ["llm.int8:threshold=6.0,compute=bf16", "llm.int8:threshold=0,compute=bf16", "fp8", "smoothquant"]
# prompt-path interpreter tests (fp16 compute: the interpreter's bf16 dot is wrong)
PROMPT_SPECS = WEIGHT_ONLY + [
    "fp8:compute=fp16",
    "llm.int8:threshold=6.0,compute=fp16",
    "smoothquant:compute=fp16",
]
TILED_SPECS = ["int4:group=128", "int4:group=32,asym", "int8", "nf4:block=64,dq=1", "fp4:block=128", "fp8"]


def _module(spec: str, n: int, k: int, bias: bool, device: str, dtype: torch.dtype):
    cfg = parse_spec(spec)
    cfg = parse_spec(
        cfg.method, overrides={**cfg.options, "compute": {torch.float16: "fp16"}.get(dtype, "bf16")}
    )
    lin = torch.nn.Linear(k, n, bias=bias, device=device)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
        lin.weight[:, :: max(1, k // 7)] *= 8  # a few large columns, like real weights
    m = METHODS[cfg.method].linear_cls.from_linear(lin, cfg)
    if bias:
        with torch.no_grad():
            m.bias.copy_(torch.randn(n, device=device))
    return m


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach(), ref.detach()
    assert bool(torch.isfinite(out).all()), "output has unwritten (NaN) or non-finite entries"
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _x(m: int, k: int, device: str, dtype: torch.dtype, outliers: bool = False) -> torch.Tensor:
    x = torch.randn(m, k, device=device, dtype=torch.float32)
    if outliers:
        x[:, 5] *= 12.0
        x[:, 17] *= 9.0
    return x.to(dtype)


def _store_mma_tiles(module) -> None:
    """Store ``module``'s codes in the tensor-core GEMV's own tiles (``layouts.mma_tile``)."""
    from quantbench.engine.kernels import layout_for
    from quantbench.engine.kernels.layouts import mma_tile, tile_buffers

    tile = mma_tile(layout_for(module))
    assert tile is not None
    module.store_tiled(tile_buffers(module, layout_for(module), *tile))


def _run_wq(module, x, options: EngineOptions = EngineOptions()):
    from quantbench.engine.kernels import layout_for, linear

    layout = layout_for(module)
    assert layout is not None
    out = torch.full((x.shape[0], layout.out_features), float("nan"), device=x.device, dtype=x.dtype)
    return linear(layout, x, out=out, options=options)


# batches 1-16 through the older kernels (the half2 GEMV / wq_matmul), for their own tests
NO_MMA = EngineOptions(mma=False)
# every / no W8A8 kind quantizes its one token inside the tensor-core GEMV
GEMV_QUANTIZES_ALL = EngineOptions(mma_quantizes=frozenset(ACT_QUANT_NAMES))
GEMV_QUANTIZES_NONE = EngineOptions(mma_quantizes=frozenset())


# ------------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("spec", WEIGHT_ONLY)
@pytest.mark.parametrize("m", [1, 3, 8, 16, 37, 128])
def test_weight_only_kernel_cuda(spec: str, m: int) -> None:
    torch.manual_seed(hash((spec, m)) % 2**31)
    n, k = 1000, 4096
    module = _module(spec, n, k, bias=m == 3, device="cuda", dtype=torch.bfloat16)
    x = _x(m, k, "cuda", torch.bfloat16)
    out = _run_wq(module, x)
    w = module.dequantize().double()
    ref = x.double() @ w.t() + (0 if module.bias is None else module.bias.double())
    assert _rel(out, ref) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("spec", ["int4:group=128", "int8", "nf4:block=64,dq=1"])
@pytest.mark.parametrize("m", [1, 8, 64])
def test_fused_silu_gate_input_cuda(spec: str, m: int) -> None:
    from quantbench.engine.kernels import layout_for, linear

    torch.manual_seed(m)
    n, k = 512, 2048
    module = _module(spec, n, k, bias=False, device="cuda", dtype=torch.bfloat16)
    gate_up = _x(m, 2 * k, "cuda", torch.bfloat16)
    out = linear(layout_for(module), gate_up, act_silu_mul=True)
    act = torch.nn.functional.silu(gate_up[:, :k]) * gate_up[:, k:]
    ref = act.double() @ module.dequantize().double().t()
    assert _rel(out, ref) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("spec", W8A8)
@pytest.mark.parametrize("m", [1, 5, 16, 128])
def test_w8a8_kernel_cuda(spec: str, m: int) -> None:
    torch.manual_seed(m + len(spec))
    n, k = 1024, 4096
    module = _module(spec, n, k, bias=True, device="cuda", dtype=torch.bfloat16)
    x = _x(m, k, "cuda", torch.bfloat16, outliers=True)
    out = _run_wq(module, x)
    cpu = copy.deepcopy(module).cpu()
    ref = cpu(x.cpu())
    assert _rel(out.cpu(), ref) < 2e-2


@pytest.mark.cuda
@pytest.mark.parametrize("spec", WEIGHT_ONLY + W8A8)
@pytest.mark.parametrize("m", [1, 2, 8, 11, 16])
@pytest.mark.parametrize("tiled", [False, True])
def test_mma_gemv_cuda(spec: str, m: int, tiled: bool) -> None:
    """The tensor-core GEMV (batches 1-16), row-major and on its own tiles, against float64
    (weight-only) or the fp32-path kernel on the same quantized activations (W8A8). 1008 rows: 63
    row tiles, an odd number of them per split."""
    from quantbench.engine.kernels import layout_for
    from quantbench.engine.kernels.routing import mma_supported

    torch.manual_seed(len(spec) * 7 + m)
    n, k = 1008, 4096
    module = _module(spec, n, k, bias=m != 2, device="cuda", dtype=torch.bfloat16)
    if tiled:
        _store_mma_tiles(module)
    x = _x(m, k, "cuda", torch.bfloat16, outliers=True)
    assert mma_supported(x, layout_for(module))
    out = _run_wq(module, x)
    if spec in W8A8:
        ref = _run_wq(module, x, NO_MMA)
    else:
        ref = x.double() @ module.dequantize().double().t()
        if module.bias is not None:
            ref = ref + module.bias.double()
    assert _rel(out, ref) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("k", [4096, 14336])
def test_mma_gemv_plain_cuda(dtype: torch.dtype, m: int, k: int) -> None:
    """Plain 16-bit linears through the tensor-core GEMV (``MODE_PLAIN``) against float64; its split-K
    partials summed in split order equal its own sum bit for bit."""
    from quantbench.engine.kernels.layouts import plain_layout_for
    from quantbench.engine.kernels.mma_gemv import mma_gemv
    from quantbench.engine.kernels.partials import Partials
    from quantbench.engine.kernels.routing import mma_supported

    torch.manual_seed(m + k)
    for bias in (True, False):
        lin = torch.nn.Linear(k, 1008, bias=bias, device="cuda", dtype=dtype)
        layout = plain_layout_for(lin)
        x = _x(m, k, "cuda", dtype, outliers=True)
        assert layout is not None and mma_supported(x, layout)
        out = torch.full((m, 1008), float("nan"), device="cuda", dtype=dtype)
        mma_gemv(x, layout, out=out)
        ref = x.double() @ lin.weight.double().t() + (lin.bias.double() if bias else 0.0)
        assert _rel(out, ref) < 1e-2
        parts = mma_gemv(x, layout, partials=True)
        assert isinstance(parts, Partials) and parts.parts.shape[0] > 1
        if not bias:
            assert torch.equal(parts.sum(), out)
    assert not mma_supported(
        x, plain_layout_for(lin.to(torch.float16 if dtype == torch.bfloat16 else torch.bfloat16))
    )


@pytest.mark.cuda
def test_engine_plain_gemv_matches_cublas_cuda() -> None:
    """A bf16 model's decode through the tensor-core GEMV (``EngineOptions.plain_*``: every product and the
    LM head) against cuBLAS: the same logits up to fp32 summation order."""
    import quantbench
    from quantbench.engine import EngineModel

    model = quantbench.random_model(
        "mistral-7b", dtype="bf16", device="cuda", num_hidden_layers=2, vocab_size=1024
    )
    ids = torch.randint(0, 1024, (1, 12), device="cuda")  # one token per decode step: the GEMV's batch
    start = torch.zeros(1, dtype=torch.int32, device="cuda")
    logits = []
    for on in (True, False):
        em = EngineModel(model, use_kernels=True, options=EngineOptions(plain_mma=on, plain_max_out=0))
        em.allocate_cache(1, 32)
        first = em.prefill(ids, start, True)
        logits.append(
            em.decode(first.argmax(-1), torch.tensor([12], dtype=torch.int32, device="cuda"), start)
        )
    assert _rel(logits[0].float(), logits[1].float()) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("spec", WEIGHT_ONLY + W8A8)
@pytest.mark.parametrize("m", [1, 8])
def test_mma_gemv_carried_activations_cuda(spec: str, m: int) -> None:
    """``mma_x_carry`` (activations loaded an iteration ahead) gives the same bits as loading them in the
    step."""
    from quantbench.engine.kernels import layout_for
    from quantbench.engine.kernels.routing import mma_supported

    torch.manual_seed(len(spec) + m)
    module = _module(spec, 1008, 4096, bias=True, device="cuda", dtype=torch.bfloat16)
    _store_mma_tiles(module)
    x = _x(m, 4096, "cuda", torch.bfloat16, outliers=True)
    assert mma_supported(x, layout_for(module))
    ref = _run_wq(module, x, EngineOptions(mma_x_carry=frozenset()))
    out = _run_wq(module, x, EngineOptions(mma_x_carry=frozenset({"int4", "table", "int8", "fp8"})))
    assert torch.equal(out, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("spec", ["nf4:block=64", "nf4:block=64,dq=1", "fp4:block=128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 8, 16])
def test_mma_gemv_pair_table_cuda(spec: str, dtype: torch.dtype, m: int) -> None:
    """NF4 / FP4 decoded through the shared pair table (any number of copies) give the same bits as the
    byte-permute decoder."""
    from quantbench.engine.kernels import layout_for
    from quantbench.engine.kernels.routing import mma_supported

    torch.manual_seed(len(spec) + m)
    module = _module(spec, 1008, 4096, bias=True, device="cuda", dtype=dtype)
    _store_mma_tiles(module)
    x = _x(m, 4096, "cuda", dtype, outliers=True)
    assert mma_supported(x, layout_for(module))
    ref = _run_wq(module, x, EngineOptions(mma_lut_copies=0))
    for copies in (4, 8, 16, 32):
        assert torch.equal(_run_wq(module, x, EngineOptions(mma_lut_copies=copies)), ref), copies


@pytest.mark.cuda
@pytest.mark.parametrize(
    "spec", ["nf4:block=64", "nf4:block=64,dq=1", "fp4:block=32", "nf4:block=64,tiles=0"]
)
@pytest.mark.parametrize("m", [1, 5, 8])
def test_mma_gemv_two_group_steps_cuda(spec: str, m: int) -> None:
    """Warp steps of two consecutive NF4 / FP4 groups (``mma_two_groups``, tiled or row-major codes) against
    the float64 product and against one group per step (only the fp32 summation order differs)."""
    from quantbench.engine.kernels import layout_for
    from quantbench.engine.kernels.mma_gemv import _subs
    from quantbench.engine.kernels.routing import decoder_kind, mma_supported

    spec, _, tiles = spec.partition(",tiles=")
    torch.manual_seed(len(spec) + m)
    module = _module(spec, 1008, 4096, bias=True, device="cuda", dtype=torch.bfloat16)
    if tiles != "0":
        _store_mma_tiles(module)
    layout = layout_for(module)
    x = _x(m, 4096, "cuda", torch.bfloat16, outliers=True)
    assert mma_supported(x, layout) and _subs(decoder_kind(layout, x.dtype), layout, m) == 2
    one = _run_wq(module, x, EngineOptions(mma_two_groups=False))
    two = _run_wq(module, x, EngineOptions(mma_two_groups=True))
    ref = x.double() @ module.dequantize().double().t() + module.bias.double()
    assert _rel(two, ref) < 1e-2
    assert _rel(two, one.double()) < 2e-3


@pytest.mark.cuda
@pytest.mark.parametrize("spec", W8A8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_gemv_quantizes_token_cuda(spec: str, dtype: torch.dtype) -> None:
    """One token of a W8A8 layer quantized inside the tensor-core GEMV against fused.act_quant + the same
    GEMV: equal up to exact rounding ties (the GEMV multiplies by 1 / scale where act_quant divides)."""
    torch.manual_seed(len(spec))
    module = _module(spec, 1008, 4096, bias=True, device="cuda", dtype=dtype)
    x = _x(1, 4096, "cuda", dtype, outliers=True)
    out = _run_wq(module, x, GEMV_QUANTIZES_ALL)
    ref = _run_wq(module, x, GEMV_QUANTIZES_NONE)
    assert _rel(out, ref) < 2e-2


@pytest.mark.cuda
@pytest.mark.parametrize("spec", ["int4:group=128", "nf4:block=64,dq=1", "int8", "fp8"])
@pytest.mark.parametrize("m", [1, 8, 16])
def test_mma_gemv_fp16_and_silu_cuda(spec: str, m: int) -> None:
    """fp16 compute (fp16 decoders and mma), and the down projection's silu(gate) * up input."""
    from quantbench.engine.kernels import layout_for, linear
    from quantbench.engine.kernels.routing import mma_supported

    torch.manual_seed(m)
    n, k = 512, 2048
    for dtype in (torch.float16, torch.bfloat16):
        module = _module(spec, n, k, bias=False, device="cuda", dtype=dtype)
        gate_up = _x(m, 2 * k, "cuda", dtype)
        layout = layout_for(module)
        assert mma_supported(gate_up[:, :k].contiguous(), layout)
        out = linear(layout, gate_up, act_silu_mul=True)
        ref = linear(layout, gate_up, act_silu_mul=True, options=NO_MMA)
        assert _rel(out, ref.double()) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("spec", WEIGHT_ONLY + W8A8)
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 3e3])
def test_h2_gemv_cuda(spec: str, magnitude: float) -> None:
    """The packed-half2 batch-1 GEMV (power-of-two activation scaling per program) at tiny, normal and
    huge activations: against float64 (weight-only) or the fp32-path kernel on the same quantized
    activations (W8A8)."""
    from quantbench.engine.kernels import layout_for
    from quantbench.engine.kernels.routing import h2_supported

    torch.manual_seed(len(spec) + int(magnitude))
    n, k = 1000, 4096
    module = _module(spec, n, k, bias=True, device="cuda", dtype=torch.bfloat16)
    x = (_x(1, k, "cuda", torch.float32, outliers=True) * magnitude).to(torch.bfloat16)
    assert h2_supported(x, layout_for(module))
    out = _run_wq(module, x, NO_MMA)
    if spec in W8A8:
        ref = _run_wq(module, x, EngineOptions(mma=False, h2=False))
    else:
        ref = x.double() @ module.dequantize().double().t() + module.bias.double()
    assert _rel(out, ref) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("spec", TILED_SPECS + ["int4:group=128,asym", "llm.int8:compute=bf16"])
def test_h2_gemv_tiled_cuda(spec: str) -> None:
    """The half2 GEMV on tile-major storage (its own block sizes) against float64 / the row-major kernel."""
    torch.manual_seed(len(spec))
    n, k = 1024, 4096
    module = _module(spec, n, k, bias=True, device="cuda", dtype=torch.bfloat16)
    twin = _tiled_twin(module, NO_MMA)
    x = _x(1, k, "cuda", torch.bfloat16, outliers=True)
    out = _run_wq(twin, x, NO_MMA)
    if spec in ("fp8", "llm.int8:compute=bf16"):
        ref = _run_wq(module, x, NO_MMA)
    else:
        ref = x.double() @ module.dequantize().double().t() + module.bias.double()
    assert _rel(out, ref) < 1e-2


@pytest.mark.cuda
def test_dispatch_hook_in_rtn_forward_cuda() -> None:
    module = _module("int4:group=128", 256, 512, bias=True, device="cuda", dtype=torch.bfloat16)
    x = _x(4, 512, "cuda", torch.bfloat16).reshape(2, 2, 512)
    out = module(x)  # RTNLinear.forward -> the engine's kernel forward (engine.kernels.dispatch) on CUDA
    ref = torch.nn.functional.linear(x.double(), module.dequantize().double(), module.bias.double())
    assert out.shape == (2, 2, 256)
    assert _rel(out, ref) < 1e-2


@pytest.mark.cuda
def test_fused_ops_cuda() -> None:
    _check_fused_ops("cuda", torch.bfloat16, batch=5, t=37, heads=32, kv=8, d=128, hidden=4096)


@pytest.mark.cuda
@pytest.mark.parametrize("d", [64, 128])
def test_extend_attention_cuda(d: int) -> None:
    _check_extend_attention("cuda", torch.bfloat16, heads=28, kv=4, d=d)


@pytest.mark.cuda
def test_decode_attention_splits_cuda() -> None:
    _check_decode_attention("cuda", torch.bfloat16, heads=32, kv=8, d=128)


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["mistral-7b", "qwen2.5-0.5b"])
def test_engine_graph_matches_eager_cuda(arch: str) -> None:
    import quantbench
    from quantbench.engine import Engine, EngineModel

    model = quantbench.random_model(arch, dtype="bf16", device="cuda", num_hidden_layers=2, vocab_size=1024)
    quantbench.quantize(model, "int4:group=128")
    ids = torch.randint(0, 1024, (3, 20), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    engine = Engine(model, cuda_graphs=True)
    graph = engine.generate(ids, mask, max_new_tokens=24, ignore_eos=True)
    assert "prefill" in engine.path and engine.graphs.prefill_captured  # the prompt pass was captured too
    eager = Engine(model, cuda_graphs=False).generate(ids, mask, max_new_tokens=24, ignore_eos=True)
    assert torch.equal(graph, eager)
    # kernels vs pure-torch reference ops: logits of prefill and one decode step
    ref = EngineModel(copy.deepcopy(model), use_kernels=False)
    ker = EngineModel(model, use_kernels=True)
    start = (mask == 0).sum(1).int()
    logits = []
    for em in (ref, ker):
        em.allocate_cache(3, 64)
        first = em.prefill(ids, start, True)
        step = em.decode(first.argmax(-1), torch.tensor([20], dtype=torch.int32, device="cuda"), start)
        logits.append((first, step))
    for a, b in zip(*logits, strict=True):
        assert _rel(b.float(), a.float()) < 2e-2


@pytest.mark.cuda
@pytest.mark.parametrize(
    "spec", ["bf16", "int4:group=128", "nf4:block=64,dq=1", "int8", "fp8", "llm.int8:compute=bf16"]
)
def test_pdl_launch_changes_no_output_cuda(spec: str) -> None:
    """Kernels launched as programmatic dependents (prefetching weights before they wait for the previous
    kernel) give bit-identical tokens and logits to plain launches: a read or write too early would not."""
    import quantbench
    from quantbench.engine import Engine
    from quantbench.engine.kernels import pdl

    if not pdl._triton_has_pdl() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("this GPU or Triton has no programmatic dependent launch")
    model = quantbench.random_model(
        "mistral-7b", dtype="bf16", device="cuda", num_hidden_layers=3, vocab_size=1024
    )
    quantbench.quantize(model, spec)
    outs = {}
    for off in (True, False):
        engine = Engine(model, cuda_graphs=True, options=EngineOptions(pdl=not off))
        for batch in (1, 4):
            ids = torch.randint(
                0, 1024, (batch, 19), device="cuda", generator=torch.Generator("cuda").manual_seed(batch)
            )
            outs[off, batch] = engine.generate(ids, max_new_tokens=40, ignore_eos=True)
    for batch in (1, 4):
        assert torch.equal(outs[True, batch], outs[False, batch])


@pytest.mark.cuda
def test_llm_int8_outlier_columns_recorded_by_producers_cuda(monkeypatch) -> None:
    """LLM.int8 prompts of ``act_rows_min_m`` tokens and more: RMSNorm (q/k/v, gate/up), the SiLU-gate
    (down) and extend's attention (o) record the outlier columns as they write a product's input, so only
    prefill's o projection input takes the column-maxima pass; prefill logits and extend's hidden states are
    bit-identical to the column-maxima pass everywhere (``act_producer_colmax`` off), with outlier columns
    present."""
    import quantbench
    from quantbench.engine import EngineModel
    from quantbench.engine.kernels import fused

    model = quantbench.random_model(
        "mistral-7b", dtype="bf16", device="cuda", num_hidden_layers=2, vocab_size=1024
    )
    quantbench.quantize(model, "llm.int8:threshold=3.5,compute=bf16")
    b, t = 2, 300  # 600 tokens: whole-row activation programs (act_rows_min_m 512)
    ids = torch.randint(0, 1024, (b, t), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    start = torch.zeros((b,), dtype=torch.int32, device="cuda")
    positions = torch.arange(t, device="cuda").expand(b, t).contiguous()
    scored = torch.tensor([[t - 3, t - 1]] * b, device="cuda")
    passes, outlier_cols = [], []
    merged = fused._merged_colmax

    def counting(x, *args):
        colmax = merged(x, *args)
        passes.append(x.shape[1])
        outlier_cols.append(int((colmax.view(torch.float32) >= 3.5).sum()))
        return colmax

    monkeypatch.setattr(fused, "_merged_colmax", counting)
    outs = {}
    for mode in ("pass", "colmax"):
        passes.clear()
        options = EngineOptions(act_producer_colmax=mode != "pass")
        em = EngineModel(model, use_kernels=True, options=options)
        em.allocate_cache(b, t)
        logits = em.prefill(ids, start, False)
        hidden, _ = em.extend(ids, positions, scored=scored)
        outs[mode] = (logits, hidden)
        # 2 layers x (prefill, extend): q/k/v, o, gate/up, down each; with the records, prefill's o alone
        # (its attention is SDPA's; extend's Triton attention records the o projection's input)
        want = [4096, 4096, 4096, 14336] * 4 if mode == "pass" else [4096] * 2
        assert passes == want, (mode, passes)
    assert any(0 < n < 4096 for n in outlier_cols), outlier_cols
    assert torch.equal(outs["colmax"][0], outs["pass"][0]) and torch.equal(outs["colmax"][1], outs["pass"][1])


@pytest.mark.cuda
def test_act_quant_bandwidth_benchmark_cuda(tmp_path) -> None:
    """``benchmarks/act_quant_bw.py`` runs every kernel of its table and writes one JSON row each."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "act_quant_bw.py"
    out = tmp_path / "act.json"
    subprocess.run([sys.executable, str(script), "--m", "600", "--k", "512", "--json", str(out)], check=True)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 7 and all(r["us"] > 0 and r["gbps"] > 0 for r in rows)


@pytest.mark.cuda
def test_dequant_bandwidth_benchmark_cuda(tmp_path) -> None:
    """``benchmarks/dequant_bw.py`` times every (method, product) it is given and writes one JSON row each."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "dequant_bw.py"
    out = tmp_path / "dequant.json"
    subprocess.run([sys.executable, str(script), "--methods", "llm.int8;int4:group=128", "--shapes", "o,down",
                    "--json", str(out)], check=True)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["product"]) for r in rows] == [
        (m, p) for m in ("llm.int8", "int4:group=128") for p in ("o", "down")
    ]
    assert all(r["us"] > 0 and r["gbps"] > 0 for r in rows)


@pytest.mark.cuda
@pytest.mark.parametrize("spec", ["int4:group=128", "int8"])
def test_prompt_slabs_on_two_streams_cuda(spec: str) -> None:
    """Prompt-sized products dequantize the next slab on a side stream while cuBLAS multiplies this one:
    the same tokens and prompt logits as one stream, eagerly and inside the captured prompt graph."""
    import quantbench
    from quantbench.engine import Engine

    model = quantbench.random_model(
        "mistral-7b", dtype="bf16", device="cuda", num_hidden_layers=2, vocab_size=1024
    )
    quantbench.quantize(model, spec)
    ids = torch.randint(0, 1024, (2, 100), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    outs = {}
    for overlap in (False, True):
        # eager_slab_elems=0: eager products on L2 slabs too, as the captured ones
        options = EngineOptions(prompt_kernel="slabs", slab_overlap=overlap, eager_slab_elems=0)
        for graphs in (False, True):
            engine = Engine(model, cuda_graphs=graphs, options=options)
            outs[overlap, graphs] = engine.generate(ids, max_new_tokens=12, ignore_eos=True)
            if graphs:
                assert engine.graphs.prefill_captured, engine.path
    for key, value in outs.items():
        assert torch.equal(value, outs[False, False]), key


def _prompt_case(
    spec: str, m: int, n: int, k: int, device: str, dtype: torch.dtype, tiled: bool, fold: bool = False
):
    """A module (tile-major like the engine's when ``tiled``), its layout, its input (quantized, with the
    per-token factors, for W8A8; ``fold``: times the factors, which are then None) and the reference
    output: float64 ``x @ dequantize().T + bias`` (weight-only) or the module's own CPU forward on the
    unquantized input (W8A8)."""
    from quantbench.engine.kernels import act_quant_torch, layout_for

    torch.manual_seed(m + len(spec))
    module = _module(spec, n, k, bias=True, device=device, dtype=dtype)
    if tiled:
        module = _tiled_twin(module)
    layout = layout_for(module)
    x = _x(m, k, device, dtype, outliers=True)
    rf = None
    if layout.act_quant:
        ref = copy.deepcopy(module).cpu()(x.cpu())
        x, rf = act_quant_torch(x, layout.act_quant, layout.threshold, False, k, fold=fold)
        rf = None if fold else rf
    else:
        ref = x.double() @ module.dequantize().double().t() + module.bias.double()
    return module, layout, x, rf, ref


@pytest.mark.cuda
@pytest.mark.parametrize("spec", WEIGHT_ONLY + W8A8)
@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("eager_elems", [1 << 28, 64 * 512])
@pytest.mark.parametrize("fold", [True, False])
def test_eager_slabs_cuda(spec: str, tiled: bool, eager_elems: int, fold: bool) -> None:
    """Products launched eagerly dequantize the whole weight (or, past ``eager_slab_elems``, a few large
    slabs through one buffer) and multiply once: against the reference, and as the L2 slabs compute;
    with the scales folded into the slabs and activations (default) or applied after the product."""
    from quantbench.engine.kernels import dequant as dq

    if tiled and spec not in TILED_SPECS:
        pytest.skip("kept row-major by the engine")
    _, layout, x, rf, ref = _prompt_case(spec, 700, 320, 512, "cuda", torch.bfloat16, tiled, fold=fold)
    eager = EngineOptions(eager_slab_elems=eager_elems, slab_fold_scales=fold)
    out = dq.dense_matmul(x, layout, row_factor=rf, options=eager)
    assert _rel(out.cpu(), ref.cpu()) < (2e-2 if layout.act_quant else 1e-2)
    l2 = dq.dense_matmul(
        x,
        layout,
        row_factor=rf,
        options=EngineOptions(slab_elems=64 * 512, eager_slab_elems=0, slab_fold_scales=fold),
    )
    assert _rel(out, l2) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("spec", WEIGHT_ONLY + W8A8)
@pytest.mark.parametrize("m", [64, 128, 300])
@pytest.mark.parametrize("tiled", [False, True])
def test_prompt_gemm_cuda(spec: str, m: int, tiled: bool) -> None:
    """The fused prompt GEMM (default config, split-K where the tiles are few) against the reference; W8A8
    against the module's own forward (same bounds as the other kernel tests)."""
    from quantbench.engine.kernels.prompt_gemm import prompt_gemm

    if tiled and spec not in TILED_SPECS:
        pytest.skip("kept row-major by the engine")
    _, layout, x, rf, ref = _prompt_case(spec, m, 1024, 4096, "cuda", torch.bfloat16, tiled)
    out = torch.full((m, 1024), float("nan"), device="cuda", dtype=torch.bfloat16)
    prompt_gemm(x, layout, row_factor=rf, out=out)
    assert _rel(out.cpu(), ref.cpu()) < (2e-2 if layout.act_quant else 1e-2)


def _compiled_variants(kernel: Any) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton version keeps no per-device kernel cache")
    return sum(len(entry[0]) for entry in caches.values())


@pytest.mark.cuda
def test_token_counts_compile_once_cuda() -> None:
    """Evaluation batches come in every token count. Triton specializes an int argument on ``% 16`` and
    ``== 1``, so a kernel taking the count would compile a variant for each, in the middle of a timed
    evaluation; the kernels of evaluation batches opt out: a second token count of the other divisibility
    compiles nothing new."""
    from quantbench.engine.kernels import dequant as dq
    from quantbench.engine.kernels import fused
    from quantbench.engine.kernels.extend_attention import _extend_attention_kernel, extend_attention
    from quantbench.engine.kernels.layouts import ACT_LLM_INT8
    from quantbench.engine.kernels.prompt_gemm import _prompt_gemm_kernel, prompt_gemm

    def compiles(kernels: list[Any], run: Callable[[int], Any], counts: tuple[int, int]) -> None:
        run(counts[0])
        torch.cuda.synchronize()
        before = [_compiled_variants(kernel) for kernel in kernels]
        run(counts[1])
        torch.cuda.synchronize()
        assert [_compiled_variants(kernel) for kernel in kernels] == before, counts

    heads, kv, d = 4, 2, 64
    ang = torch.arange(256, device="cuda").float()[:, None] * torch.rand(d // 2, device="cuda")[None, :]
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()

    def extend(t: int, p: int) -> None:
        qkv = torch.randn(2 * t, (heads + 2 * kv) * d, device="cuda", dtype=torch.bfloat16)
        past = torch.randn(1, kv, p, d, device="cuda", dtype=torch.bfloat16)
        valid = torch.ones(1, p, dtype=torch.bool, device="cuda")
        positions = (p + torch.arange(t, device="cuda")).expand(2, t).contiguous()
        index = torch.zeros(2, dtype=torch.long, device="cuda")
        extend_attention(qkv, positions, cos, sin, past, past, valid, index, None, heads, kv, d, d**-0.5)

    compiles(
        [_extend_attention_kernel, fused._rope_cache_prefill_kernel], lambda n: extend(n, n + 16), (32, 33)
    )
    _, int8, *_ = _prompt_case("int8", 64, 256, 512, "cuda", torch.bfloat16, False)
    x = torch.randn(200, 512, device="cuda", dtype=torch.bfloat16)
    post = EngineOptions(slab_fold_scales=False)  # the rescale pass runs
    compiles([dq._rescale_kernel], lambda m: dq.dense_matmul(x[:m], int8, options=post), (160, 161))
    compiles([_prompt_gemm_kernel], lambda m: prompt_gemm(x[:m], int8), (96, 97))
    big = torch.randn(400, 512, device="cuda", dtype=torch.bfloat16) * 4  # outlier columns past 6.0
    compiles(
        [fused._act_colmax_kernel, fused._act_stats_kernel, fused._act_apply_kernel],
        lambda m: fused.act_quant(big[:m], ACT_LLM_INT8, 6.0, False, 512),
        (304, 305),
    )
    rows = EngineOptions(act_rows_min_m=65)
    compiles(
        [fused._act_colmax_kernel, fused._act_quant_row_kernel],
        lambda m: fused.act_quant(big[:m], ACT_LLM_INT8, 6.0, False, 512, rows),
        (304, 305),
    )


# ------------------------------------------------------------------------------------------------------
# CPU, Triton interpreter


@interp
@pytest.mark.parametrize(
    "spec", ["int4:group=128", "int4:group=32,asym", "int8", "nf4:block=64,dq=1", "fp4:block=128"]
)
@pytest.mark.parametrize("m", [1, 3, 33])
def test_weight_only_kernel_interpreter(spec: str, m: int) -> None:
    torch.manual_seed(m)
    module = _module(spec, 48, 256, bias=m == 3, device="cpu", dtype=torch.float16)
    x = _x(m, 256, "cpu", torch.float16)
    out = _run_wq(module, x)
    ref = x.double() @ module.dequantize().double().t() + (0 if module.bias is None else module.bias.double())
    assert _rel(out, ref) < 1e-2


@interp
@pytest.mark.parametrize("spec", PROMPT_SPECS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eager_elems", [0, 1 << 28, 48 * 256])
@pytest.mark.parametrize("fold", [True, False])
def test_dense_prefill_interpreter(spec: str, dtype: torch.dtype, eager_elems: int, fold: bool) -> None:
    """Prompt path: dequantized slabs + matmul (+ bias); per-row scales and W8A8 factors folded into the
    slabs and the activations, or (``slab_fold_scales`` off, bf16) multiplied after the product. Slabs:
    L2-sized (``eager_elems`` 0, as in a captured graph: two for 80 rows), the whole weight (an eager
    product), or eager slabs through one buffer (two)."""
    from quantbench.engine.kernels import dequant as dq

    spec = spec.replace(",compute=fp16", "").replace(":compute=fp16", "")
    module, layout, x, rf, ref = _prompt_case(spec, 70, 80, 256, "cpu", dtype, False, fold=fold)
    w = torch.full((80, 256), float("nan"), dtype=dtype)
    dq.dequantize_rows(layout, 0, 80, w)
    assert _rel(w, module.dequantize().to(dtype)) < (1e-3 if dtype == torch.float16 else 1e-2)  # one ulp
    slabs = EngineOptions(slab_elems=32 * 256, eager_slab_elems=eager_elems, slab_fold_scales=fold)
    out = dq.dense_matmul(x, layout, row_factor=rf, options=slabs)
    assert _rel(out, ref) < (2e-2 if layout.act_quant else 1e-2)


@interp
@pytest.mark.parametrize("spec", PROMPT_SPECS)
@pytest.mark.parametrize("tiled", [False, True])
def test_prompt_gemm_interpreter(spec: str, tiled: bool) -> None:
    """The fused prompt GEMM: slots joined back into column order, group / row scales, split-K partials
    (two splits, token tiles smaller than M, row tiles not dividing N), tile-major codes, codes
    prefetched by hand or not."""
    from quantbench.engine.kernels.prompt_gemm import prompt_gemm

    spec = spec.replace(",compute=fp16", "").replace(":compute=fp16", "")
    if tiled and spec not in TILED_SPECS:
        pytest.skip("kept row-major by the engine")
    _, layout, x, rf, ref = _prompt_case(spec, 70, 80, 256, "cpu", torch.float16, tiled)
    bk = 128 if layout.bits == 4 else 64
    for cfg in (
        {"BM": 64, "BN": 32, "BK": 64, "SPLIT_K": 1, "PREFETCH": 1},
        {"BM": 32, "BN": 64, "BK": bk, "SPLIT_K": 2, "PREFETCH": 1},
        {"BM": 32, "BN": 64, "BK": 64, "SPLIT_K": 2, "PREFETCH": 0},
    ):
        out = torch.full((70, 80), float("nan"), dtype=torch.float16)
        prompt_gemm(x, layout, row_factor=rf, out=out, config=cfg)
        assert _rel(out, ref) < (2e-2 if layout.act_quant else 1e-2), cfg


def _tiled_twin(module, options: EngineOptions = EngineOptions()):
    from quantbench.engine.kernels.layouts import layout_for, tile_buffers, tiling_for

    # the engine's choice, or (formats it keeps row-major) 128 x 16-word tiles: every kernel reads both
    tiles = tiling_for(module, options) or tile_buffers(module, layout_for(module), 128, 16)
    assert tiles is not None and "qweight" in tiles
    twin = copy.deepcopy(module)
    twin.store_tiled(tiles)
    return twin


@interp
@pytest.mark.parametrize("spec", TILED_SPECS)
def test_tiled_storage_kernels_interpreter(spec: str) -> None:
    """Tile-major codes / scales give the same numbers as row-major ones in every kernel path: M = 1 and
    M = 3 products and the prompt path's dequantized rows (the same math, only the addresses differ)."""
    from quantbench.engine.kernels import dequant as dq
    from quantbench.engine.kernels import layout_for

    torch.manual_seed(len(spec))
    module = _module(spec, 256, 512, bias=True, device="cpu", dtype=torch.float16)
    twin = _tiled_twin(module)
    assert layout_for(twin).tile_n and not layout_for(module).tile_n
    for m in (1, 3):
        x = _x(m, 512, "cpu", torch.float16)
        assert torch.equal(_run_wq(twin, x), _run_wq(module, x))
    rows = []
    for mod in (module, twin):
        w = torch.full((100, 512), float("nan"), dtype=torch.float16)
        dq.dequantize_rows(layout_for(mod), 77, 100, w)
        rows.append(w)
    assert torch.equal(rows[0], rows[1])


@interp
@pytest.mark.parametrize("spec", ["llm.int8:threshold=6.0,compute=fp16", "fp8:compute=fp16"])
@pytest.mark.parametrize("m", [1, 4])
def test_w8a8_kernel_interpreter(spec: str, m: int) -> None:
    torch.manual_seed(m)
    module = _module(spec, 48, 256, bias=True, device="cpu", dtype=torch.float16)
    x = _x(m, 256, "cpu", torch.float16, outliers=True)
    assert _rel(_run_wq(module, x), module(x)) < 2e-2


@interp
@pytest.mark.parametrize(
    "kind,m,k,rows",
    [(kind, m, k, False) for kind in (1, 2, 3) for m in (1, 4, 37, 150) for k in (300, 2500)]
    + [(kind, 150, k, True) for kind in (1, 2, 3) for k in (300, 2500)]
    + [(1, 300, 300, False), (1, 300, 300, True)],
)
@pytest.mark.parametrize("act", [False, True])
def test_act_quant_kernel_matches_torch_interpreter(kind: int, m: int, act: bool, k: int, rows: bool) -> None:
    """W8A8 activation quantization (one-token row tile at M = 1; column-chunk statistics, then one
    program per token and chunk above; or, ``rows``, one row tile per token above 64 tokens) equals its
    torch twin exactly: the same codes / e4m3 values / outlier columns (flagged when any token crosses the
    threshold) and per-token factors, and, folded for the slab products, the same values times their
    factor. LLM.int8 at 150 tokens takes one block of tokens of the default statistics programs, at 300
    two (a column-maxima pass first); the row tiles take blocks of 128 tokens for their column maxima
    (merged atomically)."""
    from quantbench.engine import EngineOptions
    from quantbench.engine.kernels import act_quant_torch
    from quantbench.engine.kernels.fused import act_quant

    torch.manual_seed(kind * 10 + m)
    x = _x(m, 2 * k if act else k, "cpu", torch.float16, outliers=True) * 2
    if rows:
        options = EngineOptions(act_rows_min_m=65, act_tiles_outlier=(64, 128, 64, 1024))
    else:
        options = EngineOptions(act_rows_min_m=0)
    folds = (False, True) if m > 64 else (False,)
    got = {fold: act_quant(x, kind, 6.0, act, k, options, fold=fold) for fold in folds}
    if (
        act
    ):  # the reference gets silu(gate) * up from the kernels' own SiLU (exp differs by an ulp from torch's)
        from quantbench.engine.kernels.fused import silu_mul

        x = silu_mul(x)
    for fold, (xe, rf) in got.items():
        xe_ref, rf_ref = act_quant_torch(x, kind, 6.0, False, k, fold=fold)
        assert torch.equal(xe, xe_ref) and torch.allclose(rf, rf_ref, rtol=1e-6, atol=0), fold


@interp
@pytest.mark.parametrize("producer", ["silu_mul", "add_rmsnorm"])
def test_producers_record_outlier_columns_interpreter(producer: str) -> None:
    """RMSNorm and the SiLU-gate, given an ``OutlierColumns``, record exactly the columns where any token
    of what they write reaches the threshold (each column's largest such |x|, others 0), and activation
    quantization from that record equals its torch twin (and the column-maxima pass) bit for bit."""
    from quantbench.engine.kernels.fused import OutlierColumns, add_rmsnorm, silu_mul

    torch.manual_seed(7)
    m, k = 150, 300
    thr = 6.0 if producer == "silu_mul" else 2.5  # a few columns over it, besides the two scaled ones
    rec = OutlierColumns(torch.zeros((k,), dtype=torch.int32), thr)
    if producer == "silu_mul":
        gate_up = _x(m, 2 * k, "cpu", torch.float16, outliers=True)
        gate_up[9, 5], gate_up[9, k + 5] = 2.0, 2.5  # token 9: a value below 6 in outlier column 5
        x = silu_mul(gate_up, outliers=rec)
    else:
        h = _x(m, k, "cpu", torch.float16, outliers=True)
        weight = (torch.rand(k) + 0.5).to(torch.float16)
        x = add_rmsnorm(h, None, weight, 1e-6, torch.empty_like(h), outliers=rec)
    _check_outlier_record(x, rec, thr)


def _check_outlier_record(x: torch.Tensor, rec, thr: float) -> None:
    """``rec`` (an ``OutlierColumns`` a kernel filled as it wrote ``x``) holds x's outlier columns; LLM.int8
    activation quantization from the record equals its torch twin and the column-maxima pass bit for bit."""
    from quantbench.engine import EngineOptions
    from quantbench.engine.kernels import act_quant_torch
    from quantbench.engine.kernels.fused import act_quant

    k = x.shape[1]
    ax = x.float().abs()
    col = torch.where(ax >= thr, ax, torch.zeros_like(ax)).amax(0)
    assert 0 < int((col > 0).sum()) < k
    assert torch.equal(rec.colmax.view(torch.float32), col)
    options = EngineOptions(act_rows_min_m=65, act_tiles_outlier=(64, 256, 256, 128))  # three chunks a row
    for fold in (False, True):
        xe, rf = act_quant(x, 1, thr, False, k, options, fold=fold, outliers=rec)
        xe_pass, rf_pass = act_quant(x, 1, thr, False, k, options, fold=fold)
        xe_ref, rf_ref = act_quant_torch(x, 1, thr, False, k, fold=fold)
        assert torch.equal(xe, xe_ref) and torch.equal(xe, xe_pass) and torch.equal(rf, rf_pass)
        assert torch.allclose(rf, rf_ref, rtol=1e-6, atol=0)


@interp
def test_extend_attention_records_outlier_columns_interpreter() -> None:
    """The extend-attention kernel writes the o projection's input and, given an ``OutlierColumns``,
    records its outlier columns there, its output unchanged."""
    from quantbench.engine.kernels.extend_attention import extend_attention
    from quantbench.engine.kernels.fused import OutlierColumns

    torch.manual_seed(11)
    heads, kv, d, b, t, thr = 4, 2, 32, 2, 75, 0.75
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(128).float()[:, None] * inv[None, :]
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    qkv = torch.randn(b * t, (heads + 2 * kv) * d).to(torch.float16)
    positions = torch.arange(t).expand(b, t).contiguous()
    rec = OutlierColumns(torch.zeros((heads * d,), dtype=torch.int32), thr)
    args = (qkv, positions, cos, sin, None, None, None, None, None, heads, kv, d, d**-0.5)
    out, _, _ = extend_attention(*args, outliers=rec)
    plain, _, _ = extend_attention(*args)
    assert torch.equal(out, plain)
    _check_outlier_record(out, rec, thr)


@interp
def test_decode_attention_splits_interpreter() -> None:
    _check_decode_attention("cpu", torch.float16, heads=8, kv=2, d=32)


@interp
def test_fused_ops_interpreter() -> None:
    _check_fused_ops("cpu", torch.float16, batch=2, t=5, heads=4, kv=2, d=32, hidden=64)


@interp
def test_extend_attention_interpreter() -> None:
    _check_extend_attention("cpu", torch.float16, heads=4, kv=2, d=32)


@pytest.mark.skipif(CUDA or not HAS_TRITON or IN_INTERPRETER, reason="CPU with triton installed")
def test_interpreter_tests_in_own_process() -> None:
    """The interpreter tests above, in a fresh process with TRITON_INTERPRET=1 set before any import."""
    from triton_interp import run_interpreter_tests

    run_interpreter_tests(__file__, timeout=900)


# ------------------------------------------------------------------------------------------------------


def _check_decode_attention(device: str, dtype: torch.dtype, heads: int, kv: int, d: int) -> None:
    """Decode attention over a long cache with the cache split among programs (1 to 5 splits, and the
    engine's own choice): every split count matches the reference, including a sequence whose left
    padding covers whole blocks of 64 positions and a cache whose last splits are still empty, with one
    cache index for all rows and with one per row."""
    from quantbench.engine import ops as ref
    from quantbench.engine.kernels import fused

    torch.manual_seed(1)
    batch, s_max, length = 3, 300, 211
    start = torch.tensor([0, 150, 7], dtype=torch.int32, device=device)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
    ang = torch.arange(s_max, device=device).float()[:, None] * inv[None, :]
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    kc0 = torch.randn((batch, kv, s_max, d), device=device).to(dtype)
    vc0 = torch.randn((batch, kv, s_max, d), device=device).to(dtype)
    step = torch.randn(batch, (heads + 2 * kv) * d, device=device).to(dtype)
    cache_len = torch.tensor([length], dtype=torch.int32, device=device)
    # one shared cache index, then one per row (the generation loop's slots: rows of different lengths)
    per_row = torch.tensor([length, 299, 40], dtype=torch.int32, device=device)
    for lengths in (cache_len, per_row):
        want_k, want_v = kc0.clone(), vc0.clone()
        want = torch.empty((batch, heads * d), device=device, dtype=dtype)
        ref.decode_attention_ref(step, want_k, want_v, cos, sin, lengths, start, want, heads, kv, d, d**-0.5)
        for splits in (1, 2, 3, 5, None):
            kc, vc = kc0.clone(), vc0.clone()
            out = torch.full((batch, heads * d), float("nan"), device=device, dtype=dtype)
            fused.decode_attention(
                step, kc, vc, cos, sin, lengths, start, out, heads, kv, d, d**-0.5, splits=splits
            )
            assert _rel(out, want) < 1e-2, (lengths, splits)
            assert torch.equal(kc, want_k) and torch.equal(vc, want_v), (lengths, splits)


def _check_fused_ops(
    device: str, dtype: torch.dtype, batch: int, t: int, heads: int, kv: int, d: int, hidden: int
):
    from quantbench.engine import ops as ref
    from quantbench.engine.kernels import fused

    torch.manual_seed(0)
    # residual add + RMSNorm
    h = torch.randn(batch, hidden, device=device).to(dtype)
    r = torch.randn(batch, hidden, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    h1, h2 = h.clone(), h.clone()
    o1 = torch.full_like(h, float("nan"))
    o2 = torch.empty_like(h)
    fused.add_rmsnorm(h1, r, w, 1e-5, o1)
    ref.add_rmsnorm_ref(h2, r, w, 1e-5, o2)
    assert _rel(h1, h2) < 1e-2 and _rel(o1, o2) < 1e-2
    # SiLU gate
    gu = torch.randn(batch, 2 * hidden, device=device).to(dtype)
    assert _rel(fused.silu_mul(gu), ref.silu_mul_ref(gu)) < 1e-2
    # RoPE tables
    s_max = t + 8
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
    ang = torch.arange(s_max, device=device).float()[:, None] * inv[None, :]
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    start = torch.zeros(batch, dtype=torch.int32, device=device)
    start[0] = 2
    width = (heads + 2 * kv) * d
    qkv = torch.randn(batch * t, width, device=device).to(dtype)
    caches = []
    for fn in (fused.rope_cache_prefill, ref.rope_cache_prefill_ref):
        q = torch.full((batch, heads, t, d), float("nan"), device=device, dtype=dtype)
        kc = torch.zeros((batch, kv, s_max, d), device=device, dtype=dtype)
        vc = torch.zeros_like(kc)
        fn(qkv, q, kc, vc, cos, sin, start, heads, kv, d)
        caches.append((q, kc, vc))
    for a, b in zip(*caches, strict=True):
        assert _rel(a, b) < 1e-2
    # decode attention on top of that cache (left padding on sequence 0)
    step = torch.randn(batch, width, device=device).to(dtype)
    length = torch.tensor([t], dtype=torch.int32, device=device)
    outs = []
    for fn, (_, kc, vc) in zip((fused.decode_attention, ref.decode_attention_ref), caches, strict=True):
        out = torch.full((batch, heads * d), float("nan"), device=device, dtype=dtype)
        fn(step, kc, vc, cos, sin, length, start, out, heads, kv, d, d**-0.5)
        outs.append((out, kc, vc))
    for a, b in zip(*outs, strict=True):
        assert _rel(a, b) < 1e-2


def _extend_reference64(qkv, positions, cos, sin, past_k, past_v, past_valid, index, heads, kv, d):
    """Float64 attention of an extend batch, one row and head at a time: the past's real keys of sequence
    ``index[b]``, then the row's own keys causally (RoPE of q / k rounded to the input dtype first, as the
    engine stores them)."""
    b, t = positions.shape
    x = qkv.view(b, t, heads + 2 * kv, d)
    c, s = cos[positions][:, :, None, :].double(), sin[positions][:, :, None, :].double()

    def rope(part):
        half = d // 2
        a1, a2 = part[..., :half].double(), part[..., half:].double()
        return torch.cat((a1 * c - a2 * s, a2 * c + a1 * s), dim=-1).to(qkv.dtype).double()

    q, k, v = rope(x[:, :, :heads]), rope(x[:, :, heads : heads + kv]), x[:, :, heads + kv :].double()
    out = torch.empty(b, t, heads, d, dtype=torch.float64)
    for row in range(b):
        for h in range(heads):
            g = h // (heads // kv)
            keys, values = k[row, :, g], v[row, :, g]
            own = torch.ones(t, t, dtype=torch.bool).tril()
            if past_k is not None:
                src = int(index[row])
                real = past_valid[src].cpu()
                keys = torch.cat([past_k[src, g].cpu().double()[real], keys.cpu()])
                values = torch.cat([past_v[src, g].cpu().double()[real], values.cpu()])
                own = torch.cat([torch.ones(t, int(real.sum()), dtype=torch.bool), own], dim=1)
            scores = (q[row, :, h].cpu() @ keys.cpu().T) * d**-0.5
            probs = scores.masked_fill(~own, float("-inf")).softmax(-1)
            out[row, :, h] = probs @ values.cpu()
    return out.reshape(b * t, heads * d), k.transpose(1, 2), v.transpose(1, 2)


def _check_extend_attention(device: str, dtype: torch.dtype, heads: int, kv: int, d: int) -> None:
    """The Triton extend attention against float64 (and the SDPA reference): no past; a past of two
    sequences with a hole in one's real columns, picked per row by index; two query blocks (T = 70). And a
    row's output is bit for bit the same in another batch, padded wider, after a wider past."""
    from quantbench.engine import ops as ref
    from quantbench.engine.kernels.extend_attention import extend_attention

    torch.manual_seed(5)
    b, t, n_past, p = 3, 70, 2, 75
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
    ang = torch.arange(256, device=device).float()[:, None] * inv[None, :]
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    qkv = torch.randn(b * t, (heads + 2 * kv) * d, device=device).to(dtype)
    past_k = torch.randn(n_past, kv, p, d, device=device).to(dtype)
    past_v = torch.randn(n_past, kv, p, d, device=device).to(dtype)
    past_valid = torch.zeros(n_past, p, dtype=torch.bool, device=device)
    past_valid[0, :60] = True
    past_valid[1, :40] = past_valid[1, 50:70] = True  # a generation's past: prefix, pads, its own tokens
    index = torch.tensor([1, 0, 1], device=device)
    lengths = torch.tensor([70, 52, 9], device=device)
    columns = torch.arange(t, device=device)[None, :]
    plain = torch.minimum(columns, (lengths - 1)[:, None]).expand(b, t)
    for past in (False, True):
        start = past_valid.sum(1)[index] if past else torch.zeros(b, dtype=torch.long, device=device)
        positions = (start[:, None] + plain).contiguous()
        args = (past_k, past_v, past_valid, index) if past else (None, None, None, None)
        out, k, v = extend_attention(qkv, positions, cos, sin, *args, None, heads, kv, d, d**-0.5)
        want, want_k, want_v = _extend_reference64(
            qkv.cpu(), positions.cpu(), cos.cpu(), sin.cpu(), *args, heads, kv, d
        )
        assert _rel(out.cpu(), want) < 1e-2, past
        assert _rel(k.cpu(), want_k) < 1e-3 and torch.equal(v.cpu().double(), want_v)
        mask = None
        if past:
            mask = ref.extend_mask(past_valid[index], t, heads // kv, dtype)
        sdpa_out, *_ = ref.extend_attention_ref(qkv, positions, cos, sin, *args, mask, heads, kv, d, d**-0.5)
        assert _rel(out, sdpa_out) < 1e-2, past
        # what a generation step keeps: each row's past, then its own keys / values
        _, kept_k, kept_v = extend_attention(
            qkv, positions, cos, sin, *args, None, heads, kv, d, d**-0.5, with_past=True
        )
        if past:
            k, v = torch.cat([past_k[index], k], dim=2), torch.cat([past_v[index], v], dim=2)
        assert torch.equal(kept_k, k) and torch.equal(kept_v, v)
    # row 2 alone, its own width, after only its past sequence: the same bits
    alone = qkv.view(b, t, -1)[2:, :9].reshape(9, -1)
    pos = positions[2:, :9].contiguous()
    out_alone, *_ = extend_attention(
        alone, pos, cos, sin, past_k[1:, :, :70], past_v[1:, :, :70], past_valid[1:, :70], None, None,
        heads, kv, d, d**-0.5,
    )  # fmt: skip
    assert torch.equal(out_alone, out.view(b, t, -1)[2, :9])


def _check_partials_consumers(device: str, dtype: torch.dtype) -> None:
    """The kernels that read a product's split-K partials (RMSNorm's residual, SiLU-gate, decode attention)
    give exactly what they give for the partials summed in split order and rounded (``Partials.sum``)."""
    from quantbench.engine.kernels import fused
    from quantbench.engine.kernels.partials import Partials

    torch.manual_seed(3)
    batch, hidden, heads, kv, d, s_max = 2, 64, 4, 2, 32, 40

    def parts(n: int) -> Partials:
        return Partials(torch.randn(3, batch, n, device=device), dtype)

    res = parts(hidden)
    h = torch.randn(batch, hidden, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    outs = []
    for r in (res, res.sum()):
        hh, o = h.clone(), torch.empty_like(h)
        fused.add_rmsnorm(hh, r, w, 1e-5, o)
        outs.append((hh, o))
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    gate_up = parts(2 * hidden)
    assert torch.equal(fused.silu_mul(gate_up), fused.silu_mul(gate_up.sum()))
    qkv = parts((heads + 2 * kv) * d)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
    ang = torch.arange(s_max, device=device).float()[:, None] * inv[None, :]
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    start = torch.tensor([0, 5], dtype=torch.int32, device=device)
    length = torch.tensor([21], dtype=torch.int32, device=device)
    kc0 = torch.randn((batch, kv, s_max, d), device=device).to(dtype)
    results = []
    for q in (qkv, qkv.sum()):
        kc, vc = kc0.clone(), kc0.flip(-1).clone()
        out = torch.empty((batch, heads * d), device=device, dtype=dtype)
        fused.decode_attention(q, kc, vc, cos, sin, length, start, out, heads, kv, d, d**-0.5)
        results.append((out, kc, vc))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@interp
def test_partials_consumers_interpreter() -> None:
    _check_partials_consumers("cpu", torch.float16)


@pytest.mark.cuda
def test_partials_consumers_cuda() -> None:
    _check_partials_consumers("cuda", torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("spec", WEIGHT_ONLY + W8A8)
@pytest.mark.parametrize("m", [1, 8])
def test_mma_gemv_partials_cuda(spec: str, m: int) -> None:
    """The tensor-core GEMV's split-K partials summed in split order (``Partials.sum``) are bit-identical to
    the product the GEMV sums itself (no bias; with a bias, split 0 carries it: equal to fp32 rounding)."""
    from quantbench.engine.kernels import layout_for, linear
    from quantbench.engine.kernels.partials import Partials

    torch.manual_seed(m + len(spec))
    for bias in (False, True):
        module = _module(spec, 1024, 4096, bias=bias, device="cuda", dtype=torch.bfloat16)
        layout = layout_for(module)
        x = _x(m, 4096, "cuda", torch.bfloat16, outliers=True)
        parts = linear(layout, x, partials=True, options=GEMV_QUANTIZES_ALL)
        whole = linear(layout, x, options=GEMV_QUANTIZES_ALL)
        assert isinstance(parts, Partials) and parts.parts.shape[0] > 1
        if bias:
            assert _rel(parts.sum(), whole.double()) < 1e-2
        else:
            assert torch.equal(parts.sum(), whole)


def _check_greedy_pick(device: str, dtype: torch.dtype) -> None:
    """The fused greedy tail picks ``torch.argmax``'s index (the first of tied maxima, also across the
    kernel's 32768-logit blocks) and writes it as the next token and into the output at ``len - base``."""
    from quantbench.engine.kernels.fused import greedy_pick

    torch.manual_seed(5)
    for vocab in (1000, 70000):
        logits = torch.randn(4, vocab, device=device).to(dtype)
        logits[1, [7, 40000 % vocab, vocab - 1]] = 9.0  # tied maxima (across blocks for 70000)
        logits[2, :] = -float("inf")
        logits[3, vocab // 2] = float("nan")
        tokens = torch.zeros(4, dtype=torch.long, device=device)
        out = torch.full((4, 12), -1, dtype=torch.long, device=device)
        cache_len = torch.tensor([9], dtype=torch.int32, device=device)
        base = torch.tensor([4], dtype=torch.int32, device=device)
        greedy_pick(logits, tokens, out, cache_len, base)
        want = logits.argmax(dim=-1)
        assert torch.equal(tokens, want), vocab
        assert torch.equal(out[:, 5], want) and bool((out[:, :5] == -1).all() and (out[:, 6:] == -1).all())


@interp
def test_greedy_pick_interpreter() -> None:
    _check_greedy_pick("cpu", torch.float16)


@pytest.mark.cuda
def test_greedy_pick_cuda() -> None:
    _check_greedy_pick("cuda", torch.bfloat16)
