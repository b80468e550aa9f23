"""SmoothQuant: smoothing is exact on the float model, the W8A8 Linear matches a float64 reference of
the same math, and the int8 matmul path equals exact integer arithmetic."""

from __future__ import annotations

import pytest
import torch

import quantbench
from quantbench.quant.awq import fold_into_norm, scale_linear_inputs
from quantbench.quant.calib import CalibData
from quantbench.quant.config import parse_spec
from quantbench.quant.smoothquant import (
    SmoothQuantLinear,
    int8_matmul,
    quantize_per_token,
    smoothing_groups,
    smoothing_scales,
)


def _tiny(dtype=torch.float64):
    return quantbench.random_model(
        "qwen2.5-0.5b",
        dtype=dtype,
        num_hidden_layers=2,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    )


def test_smoothing_leaves_float_outputs_unchanged():
    """alpha=0.5 scales from real (captured) activation maxima, folded into the norms (and up->down):
    float64 logits unchanged to 1e-9 relative."""
    model = _tiny()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    for layer in model.model.layers:
        for _label, prev, linears in smoothing_groups(layer, with_down=True):
            width = next(iter(linears.values())).in_features
            act_max = torch.rand(width, dtype=torch.float64) * 10
            act_max[0] = 0  # a channel never seen keeps scale 1
            s = smoothing_scales(act_max, [lin.weight for lin in linears.values()], 0.5)
            assert s[0] == 1
            if isinstance(prev, torch.nn.Linear):
                from quantbench.quant.awq import fold_into_linear_rows

                fold_into_linear_rows(prev, s)
            else:
                fold_into_norm(prev, s)
            for lin in linears.values():
                scale_linear_inputs(lin, s)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_smoothing_scale_formula():
    act = torch.tensor([4.0, 1.0, 9.0])
    w = torch.tensor([[1.0, 4.0, 1.0], [0.5, -1.0, 4.0]])
    s = smoothing_scales(act, [w], alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([2.0 / 1.0, 1.0 / 2.0, 3.0 / 2.0]))


def test_int8_matmul_exact():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (33, 200), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (48, 200), generator=gen, dtype=torch.int8)
    ref = a.long() @ b.long().t()
    assert torch.equal(int8_matmul(a, b).long(), ref)


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_w8a8_matches_float64_reference(compute):
    """Same math in float64: per-channel int8 weights, per-token int8 activations (scales computed
    in float32, as the module does), exact integer products, then the two scales. Tolerance: float32
    rounding of the final scaling (rtol 1e-6) for fp32 compute; bf16 output rounding (rtol 1e-2)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    config = parse_spec(f"smoothquant:compute={compute}")
    module = SmoothQuantLinear.from_linear(linear, config)
    x = torch.randn(3, 7, 256) * torch.linspace(0.1, 5, 256)  # uneven channels
    out = module(x.to(config.compute_dtype)).double()
    codes, a_scale = quantize_per_token(x.reshape(-1, 256).to(config.compute_dtype))
    w = linear.weight.detach().double()
    w_scale = (w.abs().amax(1) / 127).clamp_min(1e-8)
    w_codes = torch.round(w / w_scale.unsqueeze(1)).clamp(-127, 127)
    assert torch.equal(module.qweight.double(), w_codes)
    ref = (codes.double() @ w_codes.t()) * a_scale.double() * w_scale.unsqueeze(0)
    ref = (ref + linear.bias.detach().double()).reshape(3, 7, 96)
    tol = 1e-6 if compute == "fp32" else 1e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item())
    # and the error against the float Linear is what 8-bit quantization costs
    err = (out - linear(x).double()).pow(2).mean() / linear(x).double().pow(2).mean()
    assert err < 1e-3


def test_smoothquant_whole_model():
    model = _tiny(torch.float32)
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    quantbench.quantize(model, "smoothquant:alpha=0.5,compute=fp32", calib=CalibData(ids), log=lambda s: None)
    layers = [m for m in model.modules() if isinstance(m, SmoothQuantLinear)]
    assert len(layers) == 14
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)
    with torch.no_grad():
        out = model(ids).logits
    assert (out - ref).pow(2).mean() / ref.pow(2).mean() < 1e-3
    report = quantbench.weight_report(model)
    assert 8.0 < report.bits_per_weight < 8.5


def test_eval_loader_calibrates(tiny_hf_base) -> None:
    """``quantbench ppl/eval --method smoothquant|gptq|awq`` calibrate (they used to get no data)."""
    from quantbench.eval.loading import load_for_eval
    from quantbench.quant.smoothquant import SmoothQuantLinear

    model, _ = load_for_eval(str(tiny_hf_base), "smoothquant", "cpu", calib="corpus:2x64")
    assert any(isinstance(m, SmoothQuantLinear) for m in model.modules())
    assert model.quantbench_source["calibration"]["calibration"]["source"].startswith("kjv")
