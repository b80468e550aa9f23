"""W8A8 products on 8-bit tensor cores (``engine/kernels/w8a8_gemm.py``) against the methods' own math.

int8 (LLM.int8, SmoothQuant): the reference is each module's CPU forward: ``quant.llm_int8.llm_int8_matmul``
(int8 codes per token over the non-outlier columns, ``torch._int_mm``, the outlier columns in 16 bits) and
``SmoothQuantLinear``'s forward. int32 sums are exact in both, and the factors are applied in the
reference's order, so the kernel's output is the reference's bit for bit, up to the 16-bit outlier
product's own rounding order (compared within one unit in the last place of the output).

fp8: the activation codes are ``quantize_fp8_rows``' exactly; the product is compared with the float64
value of ``(x_codes @ w_codes^T) * sx * sw + bias`` within the a-priori error bound of fp32 summation of K
exact products, the fp32 epilogue and the output's rounding (fp32 sums in another order than the CPU's
are not bit-equal). Interpreter tests (fp16: the interpreter's
bf16 ``tl.dot`` is wrong; the int8 one is exact) run in their own process on CPU; CUDA tests at real sizes.
"""

from __future__ import annotations

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
ON = EngineOptions(w8a8_gemm_tiles=(32, 32, 64, 2, 4, 2))
SLABS = EngineOptions(w8a8_gemm=frozenset())


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
    its column maxima mark exactly ``outlier_columns`` (and ``outlier_list`` lists them, in order); SmoothQuant's are ``quantize_per_token``'s; with
    the SiLU-gate (gate/up input) the same of ``silu(gate) * up``."""
    from quantbench.engine.kernels.fused import act_codes, outlier_list, outlier_maxima
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
        listed, count = outlier_list(colmax, 6.0)
        assert int(count) == cols.numel() and torch.equal(listed[: cols.numel()].cpu().long(), cols)
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
    """The int8 product of LLM.int8 (no outlier, some, more than one 32-column step of them, the SiLU-gate
    input) and SmoothQuant, codes row-major and tile-major, with and without bias, against the module's own
    forward."""
    from quantbench.engine.kernels.layouts import layout_for
    from quantbench.engine.kernels.w8a8_gemm import w8a8_product

    compute = "bf16" if dtype == torch.bfloat16 else "fp16"
    cases = [
        (f"llm.int8:compute={compute}", ()),
        (f"llm.int8:compute={compute}", (3, 64, k - 1)),
        (f"llm.int8:compute={compute}", tuple(range(1, k, 3))),
        (f"llm.int8:compute={compute},threshold=0", (3,)),
        (f"smoothquant:compute={compute}", (3,)),
    ]
    for spec, outliers in cases:
        for tile in (False, True):
            for bias in (False, True):
                module = _module(spec, k, n, bias, dtype, device, tile)
                layout = layout_for(module)
                assert bool(layout.tile_n) == tile
                x = _activations(m, k, dtype, device, outliers)
                got = w8a8_product(x, layout, options=options)
                _close_to_the_ulp(got, _reference(module, x), module, x)
    module = _module(f"llm.int8:compute={compute}", k, n, True, dtype, device, True)
    layout = layout_for(module)
    gate_up = _activations(m, 2 * k, dtype, device, outliers=(7, 40))
    got = w8a8_product(gate_up, layout, act_silu_mul=True, options=options)
    down_in = F.silu(gate_up[:, :k]) * gate_up[:, k:]
    _close_to_the_ulp(got, _reference(module, down_in), module, down_in)


def _fp8_module(k: int, n: int, bias: bool, dtype: torch.dtype, device: str, tile: bool):
    compute = "bf16" if dtype == torch.bfloat16 else "fp16"
    return _module(f"fp8:compute={compute}", k, n, bias, dtype, device, tile)


def _check_fp8_codes(device: str, dtype: torch.dtype) -> None:
    """fp8's ``act_codes``: the e4m3 codes and factors of ``quantize_fp8_rows``, bit for bit (also of
    ``silu(gate) * up``, and of an all-zero token: factor 0, codes 0)."""
    from quantbench.engine.kernels.fused import act_codes
    from quantbench.engine.kernels.layouts import layout_for
    from quantbench.quant.fp8 import quantize_fp8_rows

    m, k = 37, 192
    layout = layout_for(_fp8_module(k, 16, False, dtype, device, False))
    for silu in (False, True):
        x = _activations(m, 2 * k if silu else k, dtype, device, outliers=(5,))
        x[4] = 0
        xin = F.silu(x[:, :k]) * x[:, k:] if silu else x
        codes, rf = act_codes(x, layout, None, silu)
        want, scale = quantize_fp8_rows(xin.cpu())
        assert codes.dtype == torch.float8_e4m3fn
        assert torch.equal(codes.cpu().view(torch.uint8), want.view(torch.uint8))
        assert torch.equal(rf.cpu(), scale)


def _check_fp8_products(
    device: str, dtype: torch.dtype, m: int, k: int, n: int, options: EngineOptions
) -> None:
    """fp8 products (codes row-major and tile-major, with and without bias, the SiLU-gate input) against the
    float64 value of the reference's arithmetic (``fp8_matmul_reference``), within the error bound of
    its fp32 arithmetic: K - 1 summation roundings of the exact code products, the two factor products and
    the bias addition (``(K + 3) u`` of the summed magnitudes, u = 2^-24), then the output's rounding (half
    a unit in the last place of the output dtype)."""
    from quantbench.engine.kernels.layouts import layout_for
    from quantbench.engine.kernels.w8a8_gemm import w8a8_product
    from quantbench.quant.fp8 import quantize_fp8_rows

    u32, u_out = 2.0**-24, torch.finfo(dtype).eps / 2
    for tile in (False, True):
        for bias in (False, True):
            module = _fp8_module(k, n, bias, dtype, device, tile)
            layout = layout_for(module)
            assert bool(layout.tile_n) == tile
            for silu in (False, True):
                x = _activations(m, 2 * k if silu else k, dtype, device, outliers=(3,))
                got = w8a8_product(x, layout, act_silu_mul=silu, options=options)
                xin = (F.silu(x[:, :k]) * x[:, k:] if silu else x).cpu()
                xq, sx = quantize_fp8_rows(xin)
                wq, sw = module.row_major("qweight").cpu(), module.weight_scale.cpu().double()
                factors = sx.double()[:, None] * sw[None, :]
                exact = (xq.double() @ wq.double().t()) * factors
                magnitude = (xq.double().abs() @ wq.double().abs().t()) * factors
                if bias:
                    b = module.bias.detach().cpu().double()
                    exact, magnitude = exact + b, magnitude + b.abs()
                bound = u_out * exact.abs() + (1 + u_out) * (k + 3) * u32 * magnitude
                err = (got.cpu().double() - exact).abs()
                assert got.dtype == dtype and bool((err <= bound).all()), float((err - bound).max())


@interp
@pytest.mark.parametrize("check", [_check_act_codes, _check_fp8_codes], ids=["int8", "fp8"])
def test_act_codes_interpreter(check) -> None:
    check("cpu", torch.float16)


@interp
@pytest.mark.parametrize("check", [_check_products, _check_fp8_products], ids=["int8", "fp8"])
def test_products_interpreter(check) -> None:
    check("cpu", torch.float16, m=40, k=128, n=48, options=ON)


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
@pytest.mark.parametrize("tiles", [(128, 128, 64, 8, 4, 4), (64, 64, 64, 4, 4, 2)])
def test_int8_products_cuda(tiles: tuple[int, ...]) -> None:
    options = EngineOptions(w8a8_gemm_tiles=tiles)
    _check_products("cuda", torch.bfloat16, m=600, k=1024, n=384, options=options)
    _check_products("cuda", torch.float16, m=513, k=512, n=272, options=options)


@cuda
@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() < (8, 9), reason="needs e4m3 tensor cores")
@pytest.mark.parametrize("tiles", [(128, 128, 64, 8, 4, 4), (64, 64, 64, 4, 4, 2)])
def test_fp8_products_cuda(tiles: tuple[int, ...]) -> None:
    options = EngineOptions(w8a8_gemm_tiles=tiles)
    _check_fp8_codes("cuda", torch.bfloat16)
    _check_fp8_products("cuda", torch.bfloat16, m=600, k=1024, n=384, options=options)
    _check_fp8_products("cuda", torch.float16, m=513, k=512, n=272, options=options)


@cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_engine_products_alike_with_8bit_products_cuda() -> None:
    """LLM.int8, SmoothQuant and (sm_89+) fp8 layers of a 7B's shapes, default options: every product of a
    600-token batch runs the 8-bit kernel and stays within the W8A8 bound of the slab path's (which
    multiplies the same codes dequantized to 16 bits)."""
    import quantbench
    from quantbench.engine.kernels import linear, route_for
    from quantbench.engine.kernels.layouts import layout_for
    from quantbench.engine.kernels.routing import Kernel
    from quantbench.quant import QuantLinear

    specs = ["llm.int8:compute=bf16", "smoothquant"]
    if torch.cuda.get_device_capability() >= (8, 9):
        specs.append("fp8")
    for spec in specs:
        model = quantbench.random_model("mistral-7b", dtype="bf16", device="cuda", num_hidden_layers=1)
        kwargs = {"calib": torch.randint(0, 32000, (2, 64)).cuda()} if spec == "smoothquant" else {}
        quantbench.quantize(model, spec, **kwargs)
        for _, mod in model.named_modules():
            if isinstance(mod, QuantLinear):
                layout = layout_for(mod)
                x = torch.randn(600, mod.in_features, device="cuda", dtype=torch.bfloat16)
                assert route_for(x, layout).kernel is Kernel.W8A8_GEMM
                got, slab = linear(layout, x), linear(layout, x, options=SLABS)
                err = float((got.double() - slab.double()).norm() / slab.double().norm())
                assert err < 2e-2, (spec, err)
