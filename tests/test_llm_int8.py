"""LLM.int8() (llm_int8.py): weight/activation quantization, the exact int8 matmul, the forward against a
float64 reference of the same math and against bitsandbytes' CPU ``Linear8bitLt``."""

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
from quantbench.quant.llm_int8 import (
    LLMInt8Linear,
    dequantize_int8_rows,
    int8_matmul,
    outlier_columns,
    quantize_int8_rows,
)

UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _inputs_with_outliers(m: int, k: int, cols: list[int], seed: int = 0) -> torch.Tensor:
    """Normal activations plus a few columns that are large in every token (LLM.int8()'s setting)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    signs = torch.randint(0, 2, (m, len(cols)), generator=gen) * 2 - 1
    x[:, cols] = signs * (8 + 40 * torch.rand(m, len(cols), generator=gen))
    return x


def reference_forward(module: LLMInt8Linear, x: torch.Tensor) -> torch.Tensor:
    """The same math in float64: identical int8 codes, exact products and sums, no 16-bit rounding."""
    x = x.to(module.compute_dtype)
    cols = outlier_columns(x, module.threshold)
    rest = x.clone()
    rest[:, cols] = 0
    codes, absmax = quantize_int8_rows(rest)
    w_codes = module.qweight.double()
    sw = module.row_absmax.double() / 127
    out = (codes.double() @ w_codes.t()) * (absmax.double() / 127).unsqueeze(-1) * sw.unsqueeze(0)
    out = out + x[:, cols].double() @ (w_codes[:, cols] * sw.unsqueeze(-1)).t()
    if module.bias is not None:
        out = out + module.bias.double()
    return out


def test_weight_quantization_matches_bitsandbytes_and_bound() -> None:
    BF = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = torch.randn(64, 200) * torch.rand(64, 1)
    w[5] = 0  # an all-zero row: absmax 0, codes 0, no NaN
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        wd = w.to(dtype)
        codes, absmax = quantize_int8_rows(wd)
        ref_codes, ref_absmax, _ = BF.int8_vectorwise_quant(wd.clone())
        assert torch.equal(absmax, ref_absmax)
        ok_rows = absmax != 0  # bitsandbytes divides 127 by 0 there
        assert torch.equal(codes[ok_rows], ref_codes[ok_rows])
        assert (codes[~ok_rows] == 0).all()
        # |w - ŵ| <= scale / 2 per row (float64 check, tiny slack for the fp32 scaling).
        err = (dequantize_int8_rows(codes, absmax).double() - wd.double()).abs()
        assert (err <= (absmax.double() / 127 / 2 * (1 + 1e-5)).unsqueeze(-1)).all()


def test_activation_quantization_matches_bitsandbytes() -> None:
    BF = pytest.importorskip("bitsandbytes.functional")
    x = _inputs_with_outliers(24, 128, [3, 77, 100]).half()
    # Without decomposition: plain row-wise int8.
    codes, absmax = quantize_int8_rows(x)
    ref_codes, ref_absmax, ref_cols = BF.int8_vectorwise_quant(x.clone(), threshold=0.0)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax) and ref_cols is None
    # With threshold 6: the same outlier columns, and (since those columns are outliers in every token)
    # the same codes and token absmax for the rest.
    cols = outlier_columns(x, 6.0)
    assert cols.tolist() == [3, 77, 100]
    rest = x.clone()
    rest[:, cols] = 0
    codes, absmax = quantize_int8_rows(rest)
    ref_codes, ref_absmax, ref_cols = BF.int8_vectorwise_quant(x.clone(), threshold=6.0)
    assert torch.equal(cols, ref_cols)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    assert outlier_columns(x, 0.0).numel() == 0


@pytest.mark.parametrize(("m", "k", "n"), [(1, 3, 1), (5, 24, 7), (17, 896, 128), (3, 4864, 64)])
def test_int8_matmul_is_exact(m: int, k: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m * k + n)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    a[0] = 127  # the largest possible partial sums
    b[0] = 127
    out = int8_matmul(a, b)
    assert out.dtype == torch.int32
    assert torch.equal(out, (a.double() @ b.double().t()).to(torch.int32))


@pytest.mark.parametrize("compute", ["fp16", "bf16"])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_forward_matches_float64_reference(compute: str, threshold: float) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    module = LLMInt8Linear.from_linear(
        linear, parse_spec(f"llm.int8:threshold={threshold},compute={compute}")
    )
    x = _inputs_with_outliers(20, 256, [10, 200])
    with torch.no_grad():
        out = module(x)
    ref = reference_forward(module, x)
    u = UNIT_ROUNDOFF[module.compute_dtype]
    # Stated bound: one rounding of the output (relative u), plus, for the 16-bit outlier part, the
    # rounding of its weights and of its product (each relative u of that part's absolute size).
    xc = x.to(module.compute_dtype).double()
    cols = outlier_columns(x.to(module.compute_dtype), threshold)
    w_abs = module.dequantize().double().abs()
    outlier_size = xc[:, cols].abs() @ w_abs[:, cols].t()
    bound = u * ref.abs() + 2 * u * outlier_size + 1e-5 * (ref.abs() + 1)
    assert out.dtype == x.dtype
    assert ((out.double() - ref).abs() <= bound).all()


def test_forward_against_float_linear() -> None:
    """Outlier decomposition is what keeps int8 close to the float layer when outlier features exist."""
    torch.manual_seed(0)
    linear = nn.Linear(512, 128, bias=False)
    x = _inputs_with_outliers(32, 512, [7, 300, 301])
    ref = F.linear(x.double(), linear.weight.double())
    errors = {}
    for threshold in (0.0, 6.0):
        module = LLMInt8Linear.from_linear(linear, parse_spec(f"llm.int8:threshold={threshold}"))
        with torch.no_grad():
            out = module(x)
        errors[threshold] = ((out.double() - ref).norm() / ref.norm()).item()
    assert errors[6.0] < 0.01  # int8 weights alone cost well under 1% here
    assert errors[0.0] > 3 * errors[6.0]  # without decomposition the outliers crush the other features


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_matches_bitsandbytes_linear8bitlt(threshold: float) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    k, n = 256, 96
    weight = (torch.randn(n, k) * 0.05).half()
    bias = (torch.randn(n) * 0.1).half()
    ref = bnb.nn.Linear8bitLt(k, n, bias=True, has_fp16_weights=False, threshold=threshold)
    ref.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    ref.bias = nn.Parameter(bias.clone(), requires_grad=False)
    ref = ref.to("cpu").eval()  # moving quantizes; eval() selects the int8 matmul (not dequant + fp)
    linear = nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(weight.float())
        linear.bias.copy_(bias.float())
    module = LLMInt8Linear.from_linear(linear, parse_spec(f"llm.int8:threshold={threshold},compute=fp16"))
    assert torch.equal(module.qweight, ref.weight.data) and torch.equal(module.row_absmax, ref.weight.SCB)
    x = _inputs_with_outliers(20, k, [3, 77]).half()
    with torch.no_grad():
        ours, theirs = module(x), ref(x)
    assert ours.dtype == theirs.dtype == torch.float16
    # Same codes and int32 sums; bitsandbytes rescales with 1/127**2 and rounds to fp16 before adding
    # the fp16 outlier product, so allow a few fp16 ulps of the output scale.
    assert (ours.float() - theirs.float()).abs().max() <= 4 * 2**-11 * theirs.float().abs().max()


def test_zero_input_and_weight_rows() -> None:
    linear = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        linear.weight[3] = 0
    module = LLMInt8Linear.from_linear(linear, parse_spec("llm.int8"))
    x = torch.randn(4, 32)
    x[1] = 0
    with torch.no_grad():
        out = module(x)
    assert torch.isfinite(out).all() and (out[1] == 0).all() and (out[:, 3] == 0).all()


def test_quantize_real_model(real_model_fp32) -> None:
    model, tokenizer = real_model_fp32
    small = first_real_layers(model, 1)
    ids = tokenizer("def quicksort(items):\n    if len(items) <= 1:", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = small(ids).logits
    # Real weight quantization agrees with bitsandbytes too.
    BF = pytest.importorskip("bitsandbytes.functional")
    q_proj = small.model.layers[0].self_attn.q_proj.weight.detach()
    codes, absmax = quantize_int8_rows(q_proj)
    ref_codes, ref_absmax, _ = BF.int8_vectorwise_quant(q_proj.clone())
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)

    quantbench.quantize(small, "llm.int8:threshold=6.0")
    assert sum(isinstance(m, LLMInt8Linear) for m in small.modules()) == 7
    with torch.no_grad():
        out = small(ids).logits
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert F.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0) > 0.99
    assert quantbench.weight_report(small).bits_per_weight == pytest.approx(8.0, abs=0.05)


def test_save_load_roundtrip_bit_exact(small_random_model, tmp_path) -> None:
    model = small_random_model
    quantbench.quantize(model, "llm.int8:threshold=4,compute=bf16")
    assert_checkpoint_roundtrip(model, tmp_path / "ckpt", LLMInt8Linear)


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ("llm.int8:threshold=-1", "threshold"),
        ("llm.int8:threshold=big", "threshold"),
        ("llm.int8:compute=fp32", "compute"),
        ("llm.int8:block=64", "block"),
    ],
)
def test_bad_options(spec: str, key: str) -> None:
    with pytest.raises(QuantConfigError, match=f"'{key}'"):
        parse_spec(spec)


def test_spec_defaults() -> None:
    assert parse_spec("llm.int8").spec == "llm.int8:compute=fp16,skip=lm_head,threshold=6.0"
    assert parse_spec("llm.int8:threshold=0").options["threshold"] == 0.0


@pytest.mark.cuda
def test_cuda_int_mm_path_matches_cpu() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    module = LLMInt8Linear.from_linear(linear, parse_spec("llm.int8"))
    gpu = copy.deepcopy(module).cuda()
    for m in (1, 16, 40):
        x = _inputs_with_outliers(m, 256, [5])
        a = torch.randint(-127, 128, (m, 256), dtype=torch.int8)
        assert torch.equal(int8_matmul(a.cuda(), module.qweight.cuda()).cpu(), int8_matmul(a, module.qweight))
        with torch.no_grad():
            out_gpu = gpu(x.cuda()).cpu().double()
        ref = reference_forward(module, x)
        assert ((out_gpu - ref).abs() <= 4 * 2**-11 * (ref.abs() + 1)).all()
