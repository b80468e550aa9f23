"""W8A8 int8 products on int8 tensor cores (``engine/kernels/int8_gemm.py``) against the methods' own math.

The reference is each module's CPU forward: ``quant.llm_int8.llm_int8_matmul`` (int8 codes per token over
the non-outlier columns, ``torch._int_mm``, the outlier columns in 16 bits) and ``SmoothQuantLinear``'s
forward. int32 sums are exact in both, and the factors are applied in the reference's order, so the
kernel's output is the reference's bit for bit, up to the 16-bit outlier product's own rounding order
(compared within one unit in the last place of the output). Interpreter tests (fp16: the interpreter's
bf16 ``tl.dot`` is wrong; the int8 one is exact) run in their own process on CPU; CUDA tests at real sizes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

from quantbench import parse_spec  # noqa: E402
from quantbench.engine.options import EngineOptions  # noqa: E402
from quantbench.quant import METHODS  # noqa: E402

interp = pytest.mark.skipif(
    CUDA or not HAS_TRITON or not IN_INTERPRETER, reason="runs inside test_interpreter_tests_in_own_process"
)
cuda = pytest.mark.cuda
ON = EngineOptions(int8_gemm=True, int8_gemm_tiles=(32, 32, 64, 2, 4, 2))


def _module(spec: str, k: int, n: int, bias: bool, dtype: torch.dtype, device: str, tile: bool):
    from quantbench.engine.kernels.layouts import layout_for, tile_buffers

    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.05)
        if bias:
            linear.bias.normal_(0.0, 0.5)
    cfg = parse_spec(spec)
    module = METHODS[cfg.method].linear_cls.from_linear(linear, cfg).to(device)
    if tile:
        module.store_tiled(tile_buffers(module, layout_for(module), 16, 16))
    return module


def _activations(m: int, k: int, dtype: torch.dtype, device: str, outliers: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen)
    for col in outliers:
        x[3, col] = 9.5  # one token reaches the threshold: the whole column is an outlier
    return x.to(dtype).to(device)


def _reference(module, x: torch.Tensor) -> torch.Tensor:
    import copy

    cpu = copy.deepcopy(module).cpu()
    with torch.no_grad():
        return cpu(x.cpu()).to(x.device)


def _close_to_the_ulp(
    got: torch.Tensor, want: torch.Tensor, module=None, x: torch.Tensor | None = None
) -> None:
    """Equal up to one unit in the last place of the output dtype, of the output and (LLM.int8, given its
    ``module`` and input ``x``) of the magnitude of the 16-bit outlier product, which cuBLAS and the CPU
    may round differently."""
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = got.float().cpu(), want.float().cpu()
    scale = w.abs()
    if module is not None and getattr(module, "threshold", 0.0) > 0:
        from quantbench.quant.llm_int8 import dequantize_int8_rows, outlier_columns

        xc = x.float().cpu()
        cols = outlier_columns(xc, module.threshold)
        w_cols = dequantize_int8_rows(module.row_major("qweight")[:, cols].cpu(), module.row_absmax.cpu())
        scale = scale + xc[:, cols].abs() @ w_cols.abs().t()
    ulp = torch.finfo(want.dtype).eps * scale.clamp_min(torch.finfo(want.dtype).tiny)
    assert bool(((g - w).abs() <= ulp).all()), float((g - w).abs().max())


def _check_act_codes(device: str, dtype: torch.dtype) -> None:
    """``act_codes``: LLM.int8's codes are ``quantize_int8_rows`` of x with the outlier columns zeroed and
    its column maxima mark exactly ``outlier_columns``; SmoothQuant's are ``quantize_per_token``'s; with
    the SiLU-gate (gate/up input) the same of ``silu(gate) * up``."""
    from quantbench.engine.kernels.fused import act_codes, outlier_maxima
    from quantbench.engine.kernels.layouts import layout_for
    from quantbench.quant.llm_int8 import outlier_columns, quantize_int8_rows
    from quantbench.quant.smoothquant import quantize_per_token

    m, k = 37, 192
    compute = "bf16" if dtype == torch.bfloat16 else "fp16"
    llm = layout_for(_module(f"llm.int8:compute={compute}", k, 16, False, dtype, device, False))
    sq = layout_for(_module(f"smoothquant:compute={compute}", k, 16, False, dtype, device, False))
    assert llm.threshold == 6.0
    for silu in (False, True):
        x = _activations(m, 2 * k if silu else k, dtype, device, outliers=(5, 70))
        xin = F.silu(x[:, :k]) * x[:, k:] if silu else x
        colmax = outlier_maxima(x, llm, silu)
        codes, rf = act_codes(x, llm, colmax, silu)
        cols = outlier_columns(xin.cpu(), 6.0)
        assert torch.equal(torch.nonzero(colmax.cpu() >= 6.0).flatten(), cols) and cols.numel() >= 1
        rest = xin.cpu().clone()
        rest[:, cols] = 0
        want, absmax = quantize_int8_rows(rest)
        assert torch.equal(codes.cpu(), want)
        assert torch.equal(rf.cpu(), torch.where(absmax == 0, torch.ones_like(absmax), absmax / 127))
        assert outlier_maxima(x, sq, silu) is None
        codes, rf = act_codes(x, sq, None, silu)
        want, scales = quantize_per_token(xin.cpu())
        assert torch.equal(codes.cpu(), want) and torch.equal(rf.cpu(), scales[:, 0])


def _check_products(device: str, dtype: torch.dtype, m: int, k: int, n: int, options: EngineOptions) -> None:
    """The int8 product of LLM.int8 (no outlier, some, the SiLU-gate input) and SmoothQuant, codes
    row-major and tile-major, with and without bias, against the module's own forward; LLM.int8 with more
    outlier columns than ``int8_gemm_max_outliers`` returns None (the slabs run it)."""
    from quantbench.engine.kernels.int8_gemm import code_columns, w8a8_int8_product
    from quantbench.engine.kernels.layouts import layout_for

    compute = "bf16" if dtype == torch.bfloat16 else "fp16"
    cases = [
        (f"llm.int8:compute={compute}", ()),
        (f"llm.int8:compute={compute}", (3, 64, k - 1)),
        (f"llm.int8:compute={compute},threshold=0", (3,)),
        (f"smoothquant:compute={compute}", (3,)),
    ]
    for spec, outliers in cases:
        for tile in (False, True):
            for bias in (False, True):
                module = _module(spec, k, n, bias, dtype, device, tile)
                layout = layout_for(module)
                assert bool(layout.tile_n) == tile
                cols = torch.tensor([0, 5, k - 1], device=device)
                assert torch.equal(
                    code_columns(layout, cols).cpu(), module.row_major("qweight")[:, cols].cpu()
                )
                x = _activations(m, k, dtype, device, outliers)
                got = w8a8_int8_product(x, layout, options=options)
                _close_to_the_ulp(got, _reference(module, x), module, x)
    module = _module(f"llm.int8:compute={compute}", k, n, True, dtype, device, True)
    layout = layout_for(module)
    gate_up = _activations(m, 2 * k, dtype, device, outliers=(7, 40))
    got = w8a8_int8_product(gate_up, layout, act_silu_mul=True, options=options)
    down_in = F.silu(gate_up[:, :k]) * gate_up[:, k:]
    _close_to_the_ulp(got, _reference(module, down_in), module, down_in)
    few = dataclasses.replace(options, int8_gemm_max_outliers=2 / k)
    assert w8a8_int8_product(_activations(m, k, dtype, device, (1, 2, 3)), layout, options=few) is None


@interp
def test_act_codes_interpreter() -> None:
    _check_act_codes("cpu", torch.float16)


@interp
def test_int8_products_interpreter() -> None:
    _check_products("cpu", torch.float16, m=40, k=128, n=48, options=ON)


@pytest.mark.skipif(CUDA or not HAS_TRITON or IN_INTERPRETER, reason="CPU with triton installed")
def test_interpreter_tests_in_own_process() -> None:
    """The interpreter tests above, in a fresh process with TRITON_INTERPRET=1 set before any import."""
    from triton_interp import run_interpreter_tests

    run_interpreter_tests(__file__, timeout=900)


@cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_act_codes_cuda() -> None:
    _check_act_codes("cuda", torch.bfloat16)


@cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("tiles", [(128, 128, 128, 8, 8, 3), (64, 64, 64, 4, 4, 2)])
def test_int8_products_cuda(tiles: tuple[int, ...]) -> None:
    options = EngineOptions(int8_gemm=True, int8_gemm_tiles=tiles)
    _check_products("cuda", torch.bfloat16, m=600, k=1024, n=384, options=options)
    _check_products("cuda", torch.float16, m=513, k=512, n=272, options=options)


@cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_engine_scores_alike_with_int8_products_cuda() -> None:
    """An LLM.int8 and a SmoothQuant model evaluated through the engine with ``int8_gemm`` on: the
    product of a 600-token batch runs the int8 kernel and the logits stay within the W8A8 bound of the
    slab path's (the two differ only in how the int8 x int8 sums are accumulated)."""
    import quantbench
    from quantbench.engine.kernels import linear, route_for
    from quantbench.engine.kernels.layouts import layout_for
    from quantbench.engine.kernels.routing import Kernel
    from quantbench.quant import QuantLinear

    for spec in ("llm.int8:compute=bf16", "smoothquant"):
        model = quantbench.random_model("mistral-7b", dtype="bf16", device="cuda", num_hidden_layers=1)
        kwargs = {"calib": torch.randint(0, 32000, (2, 64)).cuda()} if spec == "smoothquant" else {}
        quantbench.quantize(model, spec, **kwargs)
        for _, mod in model.named_modules():
            if isinstance(mod, QuantLinear):
                layout = layout_for(mod)
                x = torch.randn(600, mod.in_features, device="cuda", dtype=torch.bfloat16)
                on = EngineOptions(int8_gemm=True)
                assert route_for(x, layout, on).kernel is Kernel.INT8_GEMM
                got, slab = linear(layout, x, options=on), linear(layout, x)
                err = float((got.double() - slab.double()).norm() / slab.double().norm())
                assert err < 2e-2, (spec, err)
