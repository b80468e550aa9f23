"""RTN int8/int4: packing, error bounds against float64, and the Linear replacement."""

from __future__ import annotations

import pytest
import torch

from quantbench import parse_spec
from quantbench.quant.rtn import RTNLinear, dequantize_rtn, pack_int4, quantize_rtn, unpack_int4


def test_pack_unpack_int4_roundtrip() -> None:
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 32)
    assert torch.equal(unpack_int4(packed), codes)
    # even column in the low nibble
    assert packed[0, 0].item() == codes[0, 0].item() | (codes[0, 1].item() << 4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [-1, 32, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_within_half_step(bits: int, group: int, sym: bool) -> None:
    torch.manual_seed(bits * 1000 + group + sym)
    w = torch.randn(96, 256, dtype=torch.float64) * torch.rand(96, 1, dtype=torch.float64)
    codes, scales, zeros = quantize_rtn(w, bits, group, sym)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**bits
    deq = dequantize_rtn(codes, scales, zeros, bits, torch.float64)
    g = 256 if group == -1 else group
    step = scales.double().repeat_interleave(g, dim=1)
    err = (deq - w).abs()
    # Round to nearest: at most half a step. Scales are stored in fp16 (relative rounding 2**-11),
    # so the extreme code can land up to (2**bits - 1) * 2**-11 steps off the range end.
    bound = step * (0.5 + (2**bits - 1) * 2**-11) + 1e-6 * w.abs().max()
    assert bool((err <= bound).all()), float((err / step).max())
    if sym:
        assert zeros is None
        assert bool((codes >= 0).all())


def test_asym_keeps_exact_zero() -> None:
    w = torch.rand(4, 64) + 0.5  # all positive: the range is widened to include 0
    w[:, 3] = 0.0
    codes, scales, zeros = quantize_rtn(w, 4, 32, sym=False)
    deq = dequantize_rtn(codes, scales, zeros, 4)
    assert torch.all(deq[:, 3] == 0)


@pytest.mark.parametrize("spec", ["int8", "int4:group=64", "int4:group=128,asym,compute=fp32"])
def test_rtn_linear_matches_reference(spec: str) -> None:
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 48, bias=True)
    cfg = parse_spec(spec)
    q = RTNLinear.from_linear(linear, cfg)
    ref_w = dequantize_rtn(q.codes(), q.scales, q.qzeros, q.bits, torch.float64)
    x = torch.randn(5, 256)
    ref = x.double() @ ref_w.T + linear.bias.double()
    out = q(x)
    assert out.dtype == x.dtype and out.shape == (5, 48)
    rel = (out.double() - ref).norm() / ref.norm()
    # bf16 compute: ~1e-2 relative; fp32 compute: float32 rounding only.
    assert rel < (1e-5 if cfg.compute_dtype == torch.float32 else 1e-2), float(rel)
    # and the quantization itself is close to the float layer
    dense = linear(x).double()
    assert (out.double() - dense).norm() / dense.norm() < (0.02 if q.bits == 8 else 0.15)


def test_storage_and_bits_per_weight(tiny_model) -> None:
    import quantbench

    quantbench.quantize(tiny_model, "int4:group=128")
    report = quantbench.weight_report(tiny_model)
    # 4 bits of code + one fp16 scale per 128 weights
    assert report.bits_per_weight == pytest.approx(4 + 16 / 128)
    assert report.quantized_layers == 2 * 7
    assert "lm_head" in report.skipped
