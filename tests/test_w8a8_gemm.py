"""W8A8 products on 8-bit tensor cores (``engine/kernels/w8a8_gemm.py``) against the methods' own math.

int8 (LLM.int8 without outlier decomposition, SmoothQuant): the reference is each module's CPU forward
(``quant.llm_int8.llm_int8_matmul``: int8 codes per token, ``torch._int_mm``; ``SmoothQuantLinear``'s
forward). int32 sums are exact in both and the factors are applied in the reference's order, so the outputs
agree up to the rounding of the fp32 epilogue (the GPU may fuse its product and the bias addition into one
FMA): compared within one unit in the last place of the output.

fp8: the activation codes are ``quantize_fp8_rows``' exactly; the product is compared with the float64
value of ``(x_codes @ w_codes^T) * sx * sw + bias`` within the a-priori error bound of summing K exact
products, the fp32 epilogue and the output's rounding (sums in another order than the CPU's are not
bit-equal): fp32 summation for the codes widened to fp16 (``w8a8_fp8_mma="fp16"``); for Hopper's e4m3
tensor cores (the default), sums that keep about 14 bits (DeepSeek-V3 technical report, section 3.3.2:
"limited to retaining around 14 bits"), i.e. a unit roundoff of 2^-13. Interpreter tests (fp16: the interpreter's
bf16 ``tl.dot`` is wrong; the int8 one is exact) run in their own process on CPU; CUDA tests at real sizes.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

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


def _close_to_the_ulp(got: torch.Tensor, want: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Equal up to one unit in the last place of the output dtype, plus, with a bias, one fp32 rounding of
    the scaled product: the GPU may fuse the product and the bias addition into one FMA (one rounding where
    the CPU rounds twice), which shows where the bias cancels the product."""
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = got.float().cpu(), want.float().cpu()
    ulp = torch.finfo(want.dtype).eps * w.abs().clamp_min(torch.finfo(want.dtype).tiny)
    if bias is not None:
        b = bias.detach().float().cpu()
        ulp = ulp + 2.0**-24 * ((w - b).abs() + ulp)  # |scaled product| <= |w - b| + the output's rounding
    assert bool(((g - w).abs() <= ulp).all()), float(((g - w).abs() - ulp).max())


def _gate_input(x: torch.Tensor, k: int, silu: bool) -> torch.Tensor:
    """The product's input: ``x``, or the SiLU-gate of ``x = [gate, up]`` as the engine computes it
    (``fused.silu_mul``, checked against torch's in test_kernels). The fused kernels here must agree with it
    bit for bit; torch's own SiLU can differ in the last bit of a 16-bit value (the engine's sigmoid uses
    Triton's fast exp and division)."""
    if not silu:
        return x
    from quantbench.engine.kernels.fused import silu_mul

    assert x.shape[1] == 2 * k
    return silu_mul(x)


def _check_act_codes(device: str, dtype: torch.dtype) -> None:
    """``act_codes``: LLM.int8's codes (no outlier decomposition) are ``quantize_int8_rows``', SmoothQuant's
    ``quantize_per_token``'s, bit for bit, factors too; with the SiLU-gate (gate/up input) the same of
    ``silu(gate) * up``. LLM.int8 with a threshold is refused (its products run on the slabs)."""
    from quantbench.engine.kernels.fused import act_codes
    from quantbench.engine.kernels.layouts import layout_for
    from quantbench.quant.llm_int8 import quantize_int8_rows
    from quantbench.quant.smoothquant import quantize_per_token

    m, k = 37, 192
    compute = "bf16" if dtype == torch.bfloat16 else "fp16"
    llm = layout_for(_module(f"llm.int8:compute={compute},threshold=0", k, 16, False, dtype, device, False))
    sq = layout_for(_module(f"smoothquant:compute={compute}", k, 16, False, dtype, device, False))
    for silu in (False, True):
        x = _activations(m, 2 * k if silu else k, dtype, device, outliers=(5, 70))
        x[4] = 0
        if not silu:  # ties: x = absmax / 2, where 127 / absmax rounded once or twice (torch) differ
            for row, top in enumerate((2.515625, 2.96875, 3.734375, 3.078125, 3.015625), start=6):
                x[row] = x[row] / x[row].abs().max() * (0.9 * top)
                x[row, :2] = torch.tensor([top, -top / 2])
        xin = _gate_input(x, k, silu).cpu()
        codes, rf = act_codes(x, llm, silu)
        want, absmax = quantize_int8_rows(xin)
        assert torch.equal(codes.cpu(), want)
        assert torch.equal(rf.cpu(), torch.where(absmax == 0, torch.ones_like(absmax), absmax / 127))
        codes, rf = act_codes(x, sq, silu)
        want, scales = quantize_per_token(xin)
        assert torch.equal(codes.cpu(), want) and torch.equal(rf.cpu(), scales[:, 0])
    with_outliers = layout_for(_module(f"llm.int8:compute={compute}", k, 16, False, dtype, device, False))
    with pytest.raises(ValueError, match="outlier decomposition"):
        act_codes(x[:, :k], with_outliers)


def _check_products(device: str, dtype: torch.dtype, m: int, k: int, n: int, options: EngineOptions) -> None:
    """The int8 products of LLM.int8 without outlier decomposition and of SmoothQuant, codes row-major and
    tile-major, with and without bias, also of the SiLU-gate input, against the module's own forward."""
    from quantbench.engine.kernels.layouts import layout_for
    from quantbench.engine.kernels.w8a8_gemm import w8a8_product

    compute = "bf16" if dtype == torch.bfloat16 else "fp16"
    for spec in (f"llm.int8:compute={compute},threshold=0", f"smoothquant:compute={compute}"):
        for tile in (False, True):
            for bias in (False, True):
                module = _module(spec, k, n, bias, dtype, device, tile)
                layout = layout_for(module)
                assert bool(layout.tile_n) == tile
                for silu in (False, True):
                    x = _activations(m, 2 * k if silu else k, dtype, device, (3,))
                    got = w8a8_product(x, layout, act_silu_mul=silu, options=options)
                    _close_to_the_ulp(got, _reference(module, _gate_input(x, k, silu)), module.bias)
    with_outliers = layout_for(_module(f"llm.int8:compute={compute}", k, n, False, dtype, device, False))
    with pytest.raises(ValueError, match="outlier decomposition"):
        w8a8_product(_activations(m, k, dtype, device, (3,)), with_outliers, options=options)


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
        codes, rf = act_codes(x, layout, silu)
        want, scale = quantize_fp8_rows(_gate_input(x, k, silu).cpu())
        assert codes.dtype == torch.float8_e4m3fn
        assert torch.equal(codes.cpu().view(torch.uint8), want.view(torch.uint8))
        assert torch.equal(rf.cpu(), scale)


def _check_fp8_products(
    device: str, dtype: torch.dtype, m: int, k: int, n: int, options: EngineOptions
) -> None:
    """fp8 products (codes row-major and tile-major, with and without bias, the SiLU-gate input) against the
    float64 value of the reference's arithmetic (``fp8_matmul_reference``), within the error bound of
    its arithmetic: K - 1 summation roundings of the exact code products, the two factor products and
    the bias addition (``(K + 3) u`` of the summed magnitudes; u = 2^-24 for fp32 sums, 2^-13 for the sums
    of Hopper's e4m3 tensor cores on a GPU), then the output's rounding (half a unit in the last place of
    the output dtype)."""
    from quantbench.engine.kernels.layouts import layout_for
    from quantbench.engine.kernels.w8a8_gemm import w8a8_product
    from quantbench.quant.fp8 import quantize_fp8_rows

    e4m3_sums = device == "cuda" and options.w8a8_fp8_mma == "e4m3"
    u32, u_out = 2.0 ** (-13 if e4m3_sums else -24), torch.finfo(dtype).eps / 2
    for tile in (False, True):
        for bias in (False, True):
            module = _fp8_module(k, n, bias, dtype, device, tile)
            layout = layout_for(module)
            assert bool(layout.tile_n) == tile
            for silu in (False, True):
                x = _activations(m, 2 * k if silu else k, dtype, device, outliers=(3,))
                got = w8a8_product(x, layout, act_silu_mul=silu, options=options)
                xin = _gate_input(x, k, silu).cpu()
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
@pytest.mark.parametrize("tiles", [(128, 128, 128, 8, 8, 3), (128, 128, 64, 8, 4, 4), (64, 64, 64, 4, 4, 2)])
def test_int8_products_cuda(tiles: tuple[int, ...]) -> None:
    options = EngineOptions(w8a8_gemm_tiles=tiles)
    _check_products("cuda", torch.bfloat16, m=600, k=1024, n=384, options=options)
    _check_products("cuda", torch.float16, m=513, k=512, n=272, options=options)


@cuda
@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() < (8, 9), reason="needs e4m3 tensor cores")
@pytest.mark.parametrize("tiles", [(128, 128, 128, 8, 8, 3), (128, 128, 64, 8, 4, 4), (64, 64, 64, 4, 4, 2)])
@pytest.mark.parametrize("mma", ["e4m3", "fp16"])
def test_fp8_products_cuda(tiles: tuple[int, ...], mma: str) -> None:
    options = EngineOptions(w8a8_gemm_tiles=tiles, w8a8_fp8_mma=mma)
    _check_fp8_codes("cuda", torch.bfloat16)
    _check_fp8_products("cuda", torch.bfloat16, m=600, k=1024, n=384, options=options)
    _check_fp8_products("cuda", torch.float16, m=513, k=512, n=272, options=options)


@cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_engine_products_alike_with_8bit_products_cuda() -> None:
    """LLM.int8 (no outlier decomposition), SmoothQuant and (sm_89+) fp8 layers of a 7B's shapes, default
    options: every product of a 600-token batch runs the 8-bit kernel and stays within the W8A8 bound of the
    slab path's (which multiplies the same codes dequantized to 16 bits); LLM.int8 with its threshold
    runs the slabs."""
    import quantbench
    from quantbench.engine.kernels import linear, route_for
    from quantbench.engine.kernels.layouts import layout_for
    from quantbench.engine.kernels.routing import Kernel
    from quantbench.quant import QuantLinear

    specs = ["llm.int8:compute=bf16,threshold=0", "smoothquant"]
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
    outliers = layout_for(_module("llm.int8:compute=bf16", 4096, 512, False, torch.bfloat16, "cuda", False))
    x = torch.randn(600, 4096, device="cuda", dtype=torch.bfloat16)
    assert route_for(x, outliers).kernel is Kernel.SLABS
