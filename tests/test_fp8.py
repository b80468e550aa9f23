"""FP8 E4M3 W8A8 (fp8.py): nearest-value codes, error bounds, forward against a float64 reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantbench
from quant_checks import assert_checkpoint_roundtrip, first_real_layers
from quantbench import QuantConfigError
from quantbench.quant.config import parse_spec
from quantbench.quant.fp8 import (
    FP8_MAX,
    FP8Linear,
    dequantize_fp8_rows,
    fp8_matmul_reference,
    quantize_fp8_rows,
)

E4M3 = torch.float8_e4m3fn
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _all_e4m3_values() -> torch.Tensor:
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3).double()
    return values[torch.isfinite(values)].unique()


def _check_quantization(w: torch.Tensor) -> None:
    codes, scale = quantize_fp8_rows(w)
    assert codes.dtype == E4M3 and scale.dtype == torch.float32
    assert torch.isfinite(codes.double()).all()
    w64, s64 = w.double(), scale.double().unsqueeze(-1)
    nonzero = scale > 0
    # The row absmax maps to ±448 exactly: every channel uses the whole e4m3 range.
    assert torch.equal(
        codes.double().abs().amax(dim=-1)[nonzero], torch.full_like(scale[nonzero].double(), FP8_MAX)
    )
    # Stated bound, per element: |w - ŵ| <= 2^-4 |w| (3 mantissa bits, normal range) + 2^-10 * scale
    # (half the subnormal step 2^-9 in scaled units), with 2^-20 relative slack for the fp32 division.
    err = (dequantize_fp8_rows(codes, scale).double() - w64).abs()
    bound = 2.0**-4 * w64.abs() + 2.0**-10 * s64 + 2.0**-20 * w64.abs()
    assert (err <= bound).all()


def test_weight_quantization_error_bound_random() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 300) * torch.logspace(-4, 2, 64).unsqueeze(-1)
    w[3] = 0  # all-zero row: scale 0, codes 0
    w[4, :10] = 1e-9  # tiny entries in the subnormal range of their row
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        _check_quantization(w.to(dtype) if dtype == torch.float32 else w.clamp(-6e4, 6e4).to(dtype))
    codes, scale = quantize_fp8_rows(w)
    assert scale[3] == 0 and (codes[3].float() == 0).all()


def test_codes_are_nearest_e4m3_values() -> None:
    """Each scaled value is rounded to (one of) the nearest finite e4m3 value(s)."""
    torch.manual_seed(1)
    w = torch.randn(32, 64) * 3
    codes, scale = quantize_fp8_rows(w)
    scaled = (w.double() / scale.double().unsqueeze(-1)).reshape(-1, 1)
    grid = _all_e4m3_values().unsqueeze(0)
    best = (scaled - grid).abs().amin(dim=-1)
    got = (scaled.squeeze(-1) - codes.double().reshape(-1)).abs()
    assert (got <= best + 1e-12 * scaled.abs().squeeze(-1)).all()


def test_real_weight_error_bound(real_model_fp32) -> None:
    model, _ = real_model_fp32
    layer = model.model.layers[0]
    for w in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.mlp.down_proj.weight):
        _check_quantization(w.detach())


def reference_forward(module: FP8Linear, x: torch.Tensor) -> torch.Tensor:
    """Same codes and scales, products and sums in float64."""
    x_codes, x_scale = quantize_fp8_rows(x.reshape(-1, module.in_features))
    acc = x_codes.double() @ module.qweight.double().t()
    out = acc * x_scale.double().unsqueeze(-1) * module.weight_scale.double().unsqueeze(0)
    if module.bias is not None:
        out = out + module.bias.double()
    return out


@pytest.mark.parametrize("compute", ["fp32", "bf16", "fp16"])
def test_forward_matches_float64_reference(compute: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(320, 48, bias=True)
    module = FP8Linear.from_linear(linear, parse_spec(f"fp8:compute={compute}"))
    x = torch.randn(2, 7, 320) * 2
    x[0, 0, 5] = 80.0  # a large activation: its token just gets a larger scale
    with torch.no_grad():
        out = module(x)
    assert out.shape == (2, 7, 48) and out.dtype == x.dtype
    ref = reference_forward(module, x)
    # Stated bound: one rounding to the compute dtype plus fp32 accumulation error (K * 2^-24 of the
    # sum of absolute products); the bias is added in fp32 before that rounding.
    x_codes, x_scale = quantize_fp8_rows(x.reshape(-1, 320))
    abs_sum = (x_codes.double().abs() @ module.qweight.double().abs().t()) * x_scale.double().unsqueeze(-1)
    abs_sum = abs_sum * module.weight_scale.double().unsqueeze(0)
    bound = UNIT_ROUNDOFF[module.compute_dtype] * ref.abs() + 320 * 2.0**-24 * abs_sum + 1e-7
    assert ((out.reshape(-1, 48).double() - ref).abs() <= bound).all()
    # The pure function gives the same result as the module.
    direct = fp8_matmul_reference(
        x_codes, x_scale, module.qweight, module.weight_scale, module.compute_dtype, module.bias
    )
    assert torch.equal(direct.to(x.dtype), out.reshape(-1, 48))


def test_forward_against_float_linear() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(512, 128, bias=False)
    x = torch.randn(32, 512)
    module = FP8Linear.from_linear(linear, parse_spec("fp8:compute=fp32"))
    with torch.no_grad():
        out = module(x)
    ref = F.linear(x.double(), linear.weight.double())
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    # e4m3 rounds each factor with relative error <= 2^-4 (~2^-5.6 RMS for uniform mantissas); random
    # signs make the output error about that RMS times sqrt(2): a few percent.
    assert rel < 0.05, rel


def test_zero_rows_and_tokens() -> None:
    linear = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        linear.weight[2] = 0
    module = FP8Linear.from_linear(linear, parse_spec("fp8"))
    x = torch.randn(3, 32)
    x[1] = 0
    with torch.no_grad():
        out = module(x)
    assert torch.isfinite(out).all() and (out[1] == 0).all() and (out[:, 2] == 0).all()


def test_quantize_real_model(real_model_fp32) -> None:
    model, tokenizer = real_model_fp32
    small = first_real_layers(model, 1)
    ids = tokenizer("def quicksort(items):\n    if len(items) <= 1:", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = small(ids).logits
    quantbench.quantize(small, "fp8:compute=bf16")
    modules = [m for m in small.modules() if isinstance(m, FP8Linear)]
    assert len(modules) == 7 and all(m.qweight.dtype == E4M3 for m in modules)
    with torch.no_grad():
        out = small(ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert F.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0) > 0.98
    assert quantbench.weight_report(small).bits_per_weight == pytest.approx(8.0, abs=0.05)


def test_save_load_roundtrip_bit_exact(small_random_model, tmp_path) -> None:
    model = small_random_model
    quantbench.quantize(model, "fp8")
    assert_checkpoint_roundtrip(model, tmp_path / "ckpt", FP8Linear)


@pytest.mark.parametrize(("spec", "key"), [("fp8:compute=int8", "compute"), ("fp8:block=64", "block")])
def test_bad_options(spec: str, key: str) -> None:
    with pytest.raises(QuantConfigError, match=f"'{key}'"):
        parse_spec(spec)


def test_spec_defaults() -> None:
    assert parse_spec("fp8").spec == "fp8:compute=bf16,skip=lm_head"


@pytest.mark.cuda
def test_cuda_scaled_mm_matches_reference() -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs compute capability >= 8.9 for fp8 matmuls")
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    module = FP8Linear.from_linear(linear, parse_spec("fp8:compute=bf16"))
    gpu = copy.deepcopy(module).cuda()
    for m in (1, 5, 64):
        x = torch.randn(m, 256)
        with torch.no_grad():
            out = gpu(x.cuda()).cpu().double()
        ref = reference_forward(module, x)
        # bf16 output (2^-8) plus the bias added after rounding on this path (another 2^-8).
        assert ((out - ref).abs() <= 2 * 2.0**-8 * (ref.abs() + module.bias.double().abs()) + 1e-4).all()
