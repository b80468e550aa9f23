"""NF4 / FP4 (bnb4.py): codes, absmax, nested state and dequantized weights equal bitsandbytes' bit for bit.

bitsandbytes is only a test peer. One bitsandbytes 0.50.2 CPU defect is worked around, not copied: on
AVX-512 machines its native ``dequantize_4bit`` takes ``row * (cols // block) + col // block`` as the
block of element ``(row, col)``, which is wrong when ``cols`` is a multiple of 16 but not of the block
(e.g. 96 columns, block 64). So dequantized weights are compared against bitsandbytes dequantizing the
same codes with the state's shape flattened to 1-D (its blocks really are over the flattened
tensor, as in its quantizer, the CUDA kernels and its pure-torch backend); where the row length is
a multiple of the block both spellings agree and the 2-D result is compared as well.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantbench
from quant_checks import assert_checkpoint_roundtrip, first_real_layers
from quantbench import QuantConfigError
from quantbench.quant import bnb4
from quantbench.quant.bnb4 import Bnb4Linear, dequantize_4bit, quantize_4bit
from quantbench.quant.config import parse_spec

bnb = pytest.importorskip("bitsandbytes")
BF = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(autouse=True, scope="module")
def _bitsandbytes_eager():
    # bitsandbytes wraps some pure-torch fallbacks in torch.compile; eager is faster here and is the reference.
    with torch._dynamo.config.patch(disable=True):
        yield


def _bnb_quantize(w: torch.Tensor, quant_type: str, block: int, dq: bool):
    return BF.quantize_4bit(w, blocksize=block, quant_type=quant_type, compress_statistics=dq)


def _bnb_dequantize_flat(packed: torch.Tensor, state, shape: torch.Size) -> torch.Tensor:
    """bitsandbytes' dequantization over the flattened tensor (see the module docstring)."""
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size([shape.numel()])
    return BF.dequantize_4bit(packed, flat_state).reshape(shape)


def assert_matches_bitsandbytes(
    w: torch.Tensor, quant_type: str, block: int, dq: bool, label: str = ""
) -> None:
    ref_packed, ref_state = _bnb_quantize(w, quant_type, block, dq)
    packed, state = quantize_4bit(w, quant_type, block, dq)

    assert packed.dtype == torch.uint8 and packed.shape == ((w.numel() + 1) // 2,)
    assert torch.equal(packed, ref_packed.reshape(-1)), f"{label}: packed codes"
    assert state.absmax.dtype == ref_state.absmax.dtype
    assert torch.equal(state.absmax, ref_state.absmax), f"{label}: absmax (uint8 codes when nested)"
    if dq:
        assert torch.equal(state.nested_absmax, ref_state.state2.absmax), f"{label}: nested absmax"
        assert torch.equal(state.offset, ref_state.offset), f"{label}: offset"
        assert ref_state.state2.blocksize == bnb4.NESTED_BLOCKSIZE
        assert torch.equal(bnb4.dynamic_map(), ref_state.state2.code)
    else:
        assert state.nested_absmax is None and state.offset is None

    ours = dequantize_4bit(packed, state, w.dtype)
    ref = _bnb_dequantize_flat(ref_packed, ref_state, w.shape)
    assert ours.dtype == ref.dtype == w.dtype and ours.shape == w.shape
    assert torch.equal(ours, ref), f"{label}: dequantized weight"
    if w.dim() == 2 and w.shape[1] % block == 0:
        assert torch.equal(ours, BF.dequantize_4bit(ref_packed, ref_state))


def test_tables_match_bitsandbytes() -> None:
    for quant_type in ("nf4", "fp4"):
        assert torch.equal(bnb4.code_table(quant_type), BF.get_4bit_type(quant_type, device="cpu"))
    assert torch.equal(bnb4.dynamic_map(), BF.create_dynamic_map())


# (shape, block): aligned; odd numel with a partial last block; numel < block; rows not a multiple of the
# block (the AVX-512 case above); long rows; block >= 2048 (bitsandbytes' pure-torch dequantizer).
CASES = [
    ((64, 64), 64),
    ((33, 7), 64),
    ((3, 5), 32),
    ((128, 96), 128),
    ((17, 1000), 256),
    ((300, 301), 4096),
    ((24, 512), 2048),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(("shape", "block"), CASES, ids=[f"{s[0]}x{s[1]}-b{b}" for s, b in CASES])
def test_random_matches_bitsandbytes(shape, block, quant_type, dq, dtype) -> None:
    gen = torch.Generator().manual_seed(shape[0] * 10_000 + shape[1] + block)
    # Rows of different scale so block absmaxes (and the nested quantization) vary.
    w = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 3
    assert_matches_bitsandbytes(w.to(dtype), quant_type, block, dq)


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_edge_values_match_bitsandbytes(quant_type: str, dq: bool) -> None:
    block = 64
    bounds, _ = bnb4._bounds_and_order(quant_type)
    near = torch.cat(
        [bounds, torch.nextafter(bounds, torch.tensor(2.0)), torch.nextafter(bounds, torch.tensor(-2.0))]
    )
    parts = [
        torch.zeros(block),  # an all-zero full block: absmax 0
        torch.cat(
            [torch.ones(1), near, torch.zeros(block - 1 - near.numel())]
        ),  # exactly on / next to midpoints
        torch.cat([torch.ones(1), torch.tensor([1e-3, -1e-3, 0.0, -0.0, 1e-30, -1e-30]), -torch.ones(57)]),
        torch.linspace(-5, 5, block),
        torch.zeros(7),  # an all-zero partial last block: absmax floored at 1e-38
    ]
    w = torch.cat(parts)
    assert_matches_bitsandbytes(w, quant_type, block, dq)
    # FP4 quirk kept from bitsandbytes: tiny positive values get code 8 (-0), tiny negative ones code 0 (+0).
    if quant_type == "fp4":
        codes = bnb4.unpack_nibbles(quantize_4bit(w, "fp4", block)[0], w.numel())
        assert codes[2 * block + 1].item() == 8 and codes[2 * block + 2].item() == 0


def test_nested_8bit_quantizer_hard_cases() -> None:
    """Values on and next to every dynamic-map midpoint and every 16-bit grid boundary of the CPU kernel."""
    code = bnb4.dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    k = torch.arange(65535, dtype=torch.float32)
    grid_bounds = (k + 0.5) / 32767.5 - 1.0
    probes = torch.cat([mids, grid_bounds, torch.linspace(-1, 1, 20001)])
    probes = torch.cat(
        [probes, torch.nextafter(probes, torch.tensor(2.0)), torch.nextafter(probes, torch.tensor(-2.0))]
    ).clamp(-1, 1)
    # Each block of 256 starts with 1.0 so its absmax is 1 and the probe is the normalized value itself.
    per_block = 255
    pad = (-probes.numel()) % per_block
    probes = torch.cat([probes, torch.zeros(pad)]).reshape(-1, per_block)
    x = torch.cat([torch.ones(probes.shape[0], 1), probes], dim=1).reshape(-1)
    x = torch.cat([x, torch.zeros(256), torch.randn(1000)])  # plus an all-zero block and a partial one
    ref_codes, ref_state = BF.quantize_blockwise(x, blocksize=256)
    codes, absmax = bnb4.quantize_blockwise_8bit(x, 256)
    assert torch.equal(absmax, ref_state.absmax)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(
        bnb4.dequantize_blockwise_8bit(codes, absmax, 256), BF.dequantize_blockwise(ref_codes, ref_state)
    )


def _real_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    layers = model.model.layers
    return {
        "layers.0.self_attn.q_proj": layers[0].self_attn.q_proj.weight.detach(),  # 896 x 896
        "layers.0.self_attn.k_proj": layers[0].self_attn.k_proj.weight.detach(),  # 128 x 896
        "layers.23.mlp.down_proj": layers[23].mlp.down_proj.weight.detach(),  # 896 x 4864
    }


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_real_weights_match_bitsandbytes(real_model_fp32, quant_type: str, dq: bool) -> None:
    model, _ = real_model_fp32
    for name, w in _real_weights(model).items():
        if name.endswith("down_proj") and (quant_type, dq) != ("nf4", True):
            continue  # the big one only for QLoRA's configuration, to keep the test fast
        for block in (64, 256) if name.endswith("k_proj") else (64,):
            assert_matches_bitsandbytes(w, quant_type, block, dq, label=f"{name} block {block}")
    # The same weight in bf16, as a bf16 checkpoint would hand it over.
    assert_matches_bitsandbytes(
        model.model.layers[0].self_attn.k_proj.weight.detach().bfloat16(), quant_type, 64, dq
    )


def test_dequantization_error_bound() -> None:
    """Without dq each weight is within half the widest gap of the table, times its block absmax."""
    w = torch.randn(96, 200, dtype=torch.float64).float()
    for quant_type in ("nf4", "fp4"):
        packed, state = quantize_4bit(w, quant_type, 64)
        err = (dequantize_4bit(packed, state).double() - w.double()).reshape(-1)
        code = bnb4.code_table(quant_type).double().sort().values
        half_gap = (code[1:] - code[:-1]).max() / 2
        block_absmax = state.absmax.double().repeat_interleave(64)[: w.numel()]
        assert (err.abs() <= half_gap * block_absmax * (1 + 1e-6)).all()


def test_linear_module_buffers_and_forward() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(96, 40, bias=True)
    for spec, buffers in [
        ("nf4:block=64,compute=fp32", {"qweight": (torch.uint8, (1920,)), "absmax": (torch.float32, (60,))}),
        (
            "fp4:block=32,dq=1,compute=bf16",
            {
                "qweight": (torch.uint8, (1920,)),
                "absmax": (torch.uint8, (120,)),
                "nested_absmax": (torch.float32, (1,)),
                "offset": (torch.float32, ()),
            },
        ),
    ]:
        config = parse_spec(spec)
        module = Bnb4Linear.from_linear(linear, config)
        got = {k: (v.dtype, tuple(v.shape)) for k, v in module.state_dict().items() if k != "bias"}
        assert got == {k: (d, s) for k, (d, s) in buffers.items()}
        packed, state = quantize_4bit(linear.weight.detach(), config.method, config["block"], config["dq"])
        expected_w = dequantize_4bit(packed, state, config.compute_dtype)
        assert torch.equal(module.dequantize(), expected_w)
        x = torch.randn(3, 5, 96)
        with torch.no_grad():
            out = module(x)
        ref = F.linear(x.to(config.compute_dtype), expected_w, linear.bias.detach().to(config.compute_dtype))
        assert out.dtype == x.dtype and torch.equal(out, ref.to(x.dtype))
        # An empty skeleton filled by load_state_dict is the same module.
        skeleton = Bnb4Linear(96, 40, True, config)
        skeleton.load_state_dict(module.state_dict())
        assert torch.equal(skeleton.dequantize(), module.dequantize())


def test_quantize_real_model(real_model_fp32) -> None:
    model, tokenizer = real_model_fp32
    small = first_real_layers(model, 1)
    ids = tokenizer("def quicksort(items):\n    if len(items) <= 1:", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = small(ids).logits
    quantbench.quantize(small, "nf4:block=64,dq=1,compute=bf16")
    config = small.quantbench_config
    quantized = [name for name, m in small.named_modules() if isinstance(m, Bnb4Linear)]
    assert len(quantized) == 7 and "lm_head" in small.quantbench_skipped
    with torch.no_grad():
        out = small(ids).logits
    assert out.dtype == config.compute_dtype and torch.isfinite(out).all()
    cos = F.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0)
    assert cos > 0.98, cos
    report = quantbench.weight_report(small)
    expected_bits = 4 + (8 if config["dq"] else 32) / config["block"]
    assert report.bits_per_weight == pytest.approx(expected_bits, abs=0.01)
    fields = quantbench.METHODS[config.method].table_fields(config)
    assert fields["double_quant"] == ("yes" if config["dq"] else "no")
    assert fields["group_size"] == str(config["block"])


@pytest.mark.parametrize("spec", ["nf4:dq=1", "fp4:block=128,compute=fp16"])
def test_save_load_roundtrip_bit_exact(small_random_model, tmp_path, spec: str) -> None:
    model = small_random_model
    quantbench.quantize(model, spec)
    assert_checkpoint_roundtrip(model, tmp_path / "ckpt", Bnb4Linear)


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ("nf4:block=100", "block"),
        ("fp4:block=8192", "block"),
        ("nf4:dq=maybe", "dq"),
        ("fp4:compute=int8", "compute"),
        ("nf4:group=64", "group"),
    ],
)
def test_bad_options(spec: str, key: str) -> None:
    with pytest.raises(QuantConfigError, match=f"'{key}'"):
        parse_spec(spec)


def test_spec_aliases_and_defaults() -> None:
    assert parse_spec("nf4").spec == "nf4:block=64,compute=bf16,dq=0,skip=lm_head"
    assert parse_spec("nf4:blocksize=128,double_quant=1").options["block"] == 128
    assert parse_spec("fp4:dq").options["dq"] is True
