"""The CPU fp16 linear (quant/compute.py): GPU semantics (fp16 operands, fp32 accumulation, one rounding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import quantbench
from quantbench.quant.apply import set_cpu_fp16_kernel, set_dequant_cache
from quantbench.quant.base import QuantLinear
from quantbench.quant.compute import EMULATE_MIN_ROWS, linear, linear_fp16_emulated

FP32_EPS = 2.0**-24  # unit roundoff of fp32


def _spread(*shape: int, lo: int = -14, hi: int = 5) -> torch.Tensor:
    """fp16 values of random sign with exponents spread over [lo, hi): normal fp16 magnitudes 2**-14..2**5."""
    mag = torch.exp2(torch.empty(*shape).uniform_(lo, hi))
    return (torch.randn(*shape).sign() * mag).to(torch.float16)


def _ulp(v: torch.Tensor, mantissa_bits: int, min_exp: int) -> torch.Tensor:
    """Spacing of the float format at |v| (subnormal spacing below the smallest normal)."""
    e = torch.floor(torch.log2(v.abs().clamp(min=2.0**min_exp)))
    return torch.exp2(e - mantissa_bits)


def _exact(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """float64 ``x @ w.T + b`` of the 16-bit operands: exact here (products and sums of K=64 terms fit 53 bits)."""
    out = x.double() @ w.double().t()
    return out if b is None else out + b.double()


def _bound(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """One fp16 ulp of the result, plus the worst case of an fp32 sum of K products (K * eps32 * sum|x||w|),
    which only matters where the sum cancels to far below its terms."""
    k = x.shape[-1]
    return _ulp(ref, 10, -14) + k * FP32_EPS * (x.double().abs() @ w.double().abs().t())


@pytest.mark.parametrize("with_bias", [False, True])
def test_emulated_linear_is_exact_sum_rounded_to_fp16(with_bias: bool) -> None:
    torch.manual_seed(0)
    x, w = _spread(3, 5, 64), _spread(48, 64)
    b = _spread(48) if with_bias else None
    ref = _exact(x, w, b)
    assert ref.abs().max() < 65504  # finite in fp16: overflow is tested separately
    out = linear_fp16_emulated(x, w, b)
    assert out.dtype == torch.float16 and out.shape == (3, 5, 48)
    assert ((out.double() - ref).abs() <= _bound(x, w, ref)).all()
    # Nearly every element is the correctly rounded exact value (the rest are 1 ulp off by fp32 sums).
    assert (out == ref.to(torch.float16)).float().mean() > 0.99


@pytest.mark.parametrize("with_bias", [False, True])
def test_emulated_linear_agrees_with_torch_fp16(with_bias: bool) -> None:
    """torch's own CPU fp16 kernel also accumulates in fp32: the two agree within one fp16 ulp."""
    torch.manual_seed(1)
    x, w = _spread(3, 5, 64), _spread(48, 64)
    b = _spread(48) if with_bias else None
    ours = linear_fp16_emulated(x, w, b)
    theirs = F.linear(x, w, b)
    assert theirs.dtype == torch.float16
    ref = _exact(x, w, b)
    assert ((ours.double() - theirs.double()).abs() <= _bound(x, w, ref)).all()
    assert ((theirs.double() - ref).abs() <= _bound(x, w, ref)).all()  # torch's path: the same semantics


def test_emulated_linear_overflow_and_subnormals_as_fp16() -> None:
    """Results beyond fp16's range become inf and tiny ones fp16 subnormals, as in torch's fp16 path."""
    x = torch.tensor([[256.0, 256.0], [2.0**-12, 2.0**-12], [-300.0, 300.0]], dtype=torch.float16)
    w = torch.tensor([[256.0, 0.0], [2.0**-12, 2.0**-11], [256.0, 256.0]], dtype=torch.float16)
    ours = linear_fp16_emulated(x, w)
    assert torch.equal(ours, F.linear(x, w))
    assert torch.isinf(ours[0, 0])  # 65536 > fp16 max (the fp32 accumulator itself does not overflow)
    assert ours[1, 1] == 3 * 2.0**-24  # 2**-24 + 2**-23: an exact fp16 subnormal
    assert ours[2, 2] == 0


def test_emulated_rounds_activations_and_rejects_non_fp16_weights() -> None:
    torch.manual_seed(2)
    x32, w = torch.randn(4, 64), _spread(8, 64, lo=-6, hi=0)
    assert torch.equal(linear_fp16_emulated(x32, w), linear_fp16_emulated(x32.half(), w))
    with pytest.raises(TypeError):
        linear_fp16_emulated(x32, w.float())


def test_kernel_choice_by_rows_dtype_and_option() -> None:
    torch.manual_seed(3)
    w, b = _spread(16, 64, lo=-6, hi=0), _spread(16, lo=-6, hi=0)
    many = _spread(2, EMULATE_MIN_ROWS, 64, lo=-6, hi=2)
    few = many[0, : EMULATE_MIN_ROWS - 1]
    assert torch.equal(linear(many, w, b), linear_fp16_emulated(many, w, b))  # auto: enough rows
    assert torch.equal(linear(few, w, b), F.linear(few, w, b))  # auto: torch's GEMV for a few rows
    assert torch.equal(linear(few, w, b, "emulated"), linear_fp16_emulated(few, w, b))
    assert torch.equal(linear(many, w, b, "torch"), F.linear(many, w, b))
    for dtype in (torch.float32, torch.bfloat16):  # left to torch whatever the option
        xd, wd, bd = many.to(dtype), w.to(dtype), b.to(dtype)
        assert torch.equal(linear(xd, wd, bd, "emulated"), F.linear(xd, wd, bd))
    with pytest.raises(ValueError, match="cpu_fp16"):
        linear(many, w, b, "fast")


def test_torch_cpu_bf16_linear_already_has_gpu_semantics() -> None:
    """Why bf16 is not emulated: torch's CPU bf16 linear rounds the fp32-accumulated sum once."""
    torch.manual_seed(4)
    x = _spread(3, 5, 64, lo=-20, hi=8).to(torch.bfloat16)
    w = _spread(48, 64, lo=-20, hi=8).to(torch.bfloat16)
    b = _spread(48, lo=-20, hi=8).to(torch.bfloat16)
    ref = _exact(x, w, b)
    out = F.linear(x, w, b)
    k = x.shape[-1]
    bound = _ulp(ref, 7, -126) + k * FP32_EPS * (x.double().abs() @ w.double().abs().t())
    assert ((out.double() - ref).abs() <= bound).all()


def test_set_cpu_fp16_kernel(tiny_model) -> None:
    quantbench.quantize(tiny_model, "nf4:compute=fp16")
    layers = [m for m in tiny_model.modules() if isinstance(m, QuantLinear)]
    assert all(m.cpu_fp16_kernel == "auto" for m in layers)  # the default
    assert set_cpu_fp16_kernel(tiny_model, "torch") == len(layers)
    assert all(m.cpu_fp16_kernel == "torch" for m in layers)
    with pytest.raises(ValueError, match="kernel"):
        set_cpu_fp16_kernel(tiny_model, "fast")


def test_real_model_nf4_fp16_emulated_matches_torch_fp16(fresh_real_model) -> None:
    """Real Qwen, ``nf4:compute=fp16``: the emulated and torch's fp16 kernels give (nearly) the same logits.

    Both compute every quantized product with the same semantics and differ only in the order of the
    fp32 sums, which now and then flips an fp16 rounding of a layer output by 1 ulp; such flips spread
    through 24 layers to most logits (measured: ~80 % differ, by at most ~2.5 fp16 ulps of the largest
    logit, 0.039 at |logit| 22). Bound: 8 such ulps (0.125 here), a quarter of one on average; the
    predictions (argmax) must be identical.
    """
    model, tokenizer = fresh_real_model
    quantbench.quantize(model, "nf4:compute=fp16")
    set_dequant_cache(model, True)
    ids = tokenizer("def fibonacci(n):\n    if n < 2:\n        return", return_tensors="pt").input_ids
    with torch.no_grad():
        set_cpu_fp16_kernel(model, "emulated")
        emulated = model(ids).logits
        set_cpu_fp16_kernel(model, "torch")
        torch_fp16 = model(ids).logits
    assert emulated.dtype == torch_fp16.dtype == torch.float16 and torch.isfinite(emulated).all()
    diff = (emulated.double() - torch_fp16.double()).abs()
    ulp = _ulp(torch_fp16.double().abs().amax(), 10, -14)  # fp16 spacing at the largest logit
    assert diff.max() <= 8 * ulp and diff.mean() <= 0.25 * ulp, (diff.max().item(), diff.mean().item(), ulp)
    assert torch.equal(emulated.argmax(-1), torch_fp16.argmax(-1))
