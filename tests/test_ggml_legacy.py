"""llama.cpp's q8_0 / q4_0 / q4_1 / q5_0 / q5_1: bytes identical to llama.cpp, and the Linear built on them.

Two references: gguf-py's numpy quantizers (``gguf.quants``, kept bit-exact with llama.cpp's C reference
by its maintainers) on random and awkward weights, and, for the blocks of signed zeros where gguf-py's
numpy port and the C code disagree, a line-by-line scalar transcription of the C functions below.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

import quantbench
from quant_checks import assert_checkpoint_roundtrip
from quantbench.errors import QuantConfigError
from quantbench.quant import METHODS, parse_spec
from quantbench.quant.apply import replace_with_empty
from quantbench.quant.ggml import FORMATS, GGMLLinear, ggml_format, register_format
from quantbench.quant.ggml_legacy import (
    dequantize_q4_0,
    dequantize_q4_1,
    dequantize_q5_0,
    dequantize_q5_1,
    dequantize_q8_0,
    quantize_q4_0,
    quantize_q4_1,
    quantize_q5_0,
    quantize_q5_1,
    quantize_q8_0,
)

FUNCS = {
    "q8_0": (quantize_q8_0, dequantize_q8_0),
    "q4_0": (quantize_q4_0, dequantize_q4_0),
    "q4_1": (quantize_q4_1, dequantize_q4_1),
    "q5_0": (quantize_q5_0, dequantize_q5_0),
    "q5_1": (quantize_q5_1, dequantize_q5_1),
}
TYPES = list(FUNCS)
BITS = {"q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0}


def _gtype(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name.upper()]


def _awkward_blocks() -> torch.Tensor:
    """One row per awkward 32-weight block (each type's rounding ties sit on its own rows)."""
    ramp = torch.arange(32, dtype=torch.float32)
    rows = [
        torch.zeros(32),  # all zero: d = 0, codes from id = 0
        torch.full((32,), 0.25),  # constant: q4_1/q5_1 range 0
        torch.full((32,), -3.0),  # constant negative
        torch.cat([torch.full((31,), 1e-3), torch.tensor([1e3])]),  # one huge outlier
        torch.cat([torch.tensor([-5.0]), torch.linspace(-1, 1, 31)]),  # negative extreme first
        torch.cat([torch.linspace(-1, 1, 31), torch.tensor([-5.0])]),  # negative extreme last
        torch.cat([torch.tensor([2.0, -2.0]), torch.linspace(-1, 1, 30)]),  # +a before -a: +a sets the sign
        torch.cat([torch.tensor([-2.0, 2.0]), torch.linspace(-1, 1, 30)]),  # -a before +a
        torch.linspace(-1e-6, 1e-6, 32),  # scale below fp16's normal range (subnormal d)
        torch.linspace(-6e4, 6e4, 32),  # near the fp16 maximum
        # q8_0 ties: amax 127 gives d = 1, id = 1, so k + 0.5 is an exact tie for roundf
        torch.cat([torch.tensor([127.0]), torch.arange(-15, 16).float() + 0.5]),
        torch.cat([torch.tensor([-127.0]), -(torch.arange(-15, 16).float() + 0.5)]),
        # q4_0 ties: signed max -8 gives d = 1, id = 1, so x + 8.5 lands on integers
        torch.cat([torch.tensor([-8.0]), (ramp[:31] - 15) / 2]),
        # q4_0 with signed max +8: d = -1, id = -1
        torch.cat([torch.tensor([8.0]), (ramp[:31] - 15) / 2]),
        # q5_0 ties: signed max -16, d = 1
        torch.cat([torch.tensor([-16.0]), ramp[:31] - 15.5]),
        # q4_1 ties: min 0, max 15 -> d = 1, (x - min) + 0.5 exact
        torch.cat([torch.tensor([0.0, 15.0]), torch.arange(30).float() / 2]),
        # q5_1 ties: min 0, max 31 -> d = 1
        torch.cat([torch.tensor([0.0, 31.0]), torch.arange(30).float() + 0.5]),
        # halves just below a tie (0.49999997 must not round up)
        torch.cat([torch.tensor([127.0]), torch.full((31,), 0.5 - 2**-25)]),
    ]
    return torch.stack(rows)


def _random_weights(seed: int) -> torch.Tensor:
    """Random rows, blocks of very different magnitude, some rows of integers (exact ties for the codes)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 256, generator=g)
    w = w * torch.exp(2 * torch.randn(48, 8, 1, generator=g)).expand(48, 8, 32).reshape(48, 256)
    # + 0.0 turns the -0.0 that round() gives small negatives into +0.0: blocks of signed zeros are
    # where gguf-py differs from C (tested against the C transcription instead)
    w[::5] = (w[::5] * 4).round() + 0.0
    return w


# ---- a scalar transcription of llama.cpp's ggml-quants.c reference quantizers (np.float32 arithmetic) ----

f32 = np.float32


def _fp16_bytes(v: np.float32) -> list[int]:
    return list(np.array([v], dtype=np.float16).view(np.uint8))


def _c_roundf(v: np.float32) -> int:
    return int(math.copysign(math.floor(abs(float(v)) + 0.5), float(v)))  # exact in double


def _c_ref(name: str, block: np.ndarray) -> list[int]:
    """``quantize_row_<name>_ref`` for one block of 32 float32 values."""
    x = [f32(v) for v in block]
    if name == "q8_0":
        amax = f32(0.0)
        for v in x:
            amax = amax if amax > abs(v) else abs(v)  # MAX(amax, fabsf(v))
        d = f32(amax / f32(127))
        inv = f32(f32(1.0) / d) if d else f32(0.0)
        return _fp16_bytes(d) + [_c_roundf(f32(v * inv)) & 0xFF for v in x]
    if name in ("q4_0", "q5_0"):
        half, top = (8, 15) if name == "q4_0" else (16, 31)
        amax, vmax = f32(0.0), f32(0.0)
        for v in x:
            if amax < abs(v):
                amax, vmax = abs(v), v
        d = f32(vmax / f32(-half))
        inv = f32(f32(1.0) / d) if d else f32(0.0)
        q = [min(top, int(f32(f32(v * inv) + f32(half + 0.5)))) for v in x]  # (int8_t) truncates
        out = _fp16_bytes(d)
    else:
        top = 15 if name == "q4_1" else 31
        lo, hi = f32(np.finfo(np.float32).max), f32(-np.finfo(np.float32).max)
        for v in x:
            if v < lo:
                lo = v
            if v > hi:
                hi = v
        d = f32(f32(hi - lo) / f32(top))
        inv = f32(f32(1.0) / d) if d else f32(0.0)
        q = [int(f32(f32(f32(v - lo) * inv) + f32(0.5))) for v in x]  # (int8_t) / (uint8_t) truncate
        q = [min(top, c) for c in q] if name == "q4_1" else q  # q5_1 has no MIN in C
        out = _fp16_bytes(d) + _fp16_bytes(lo)
    if name in ("q5_0", "q5_1"):
        qh = sum(((c >> 4) & 1) << i for i, c in enumerate(q))
        out += list(qh.to_bytes(4, "little"))
    return out + [(q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4) for j in range(16)]


# ---- bytes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TYPES)
def test_bytes_and_dequantize_match_gguf(name: str) -> None:
    quantize, dequantize = FUNCS[name]
    w = torch.cat([_random_weights(TYPES.index(name)), _awkward_blocks().repeat(1, 8)[:, :256]])
    ours = quantize(w)
    ref = quants.quantize(w.numpy(), _gtype(name)).view(np.uint8)
    fmt = ggml_format(name)
    assert ours.dtype == torch.uint8 and ours.shape == (w.shape[0], 256 // 32 * fmt.type_size)
    np.testing.assert_array_equal(ours.numpy(), ref)
    ref_deq = quants.dequantize(ref, _gtype(name))
    deq = dequantize(ours)
    assert deq.dtype == torch.float32
    np.testing.assert_array_equal(deq.numpy(), ref_deq)  # NaN-free: every scale above is finite in fp16


@pytest.mark.parametrize("name", TYPES)
def test_awkward_blocks_match_the_c_reference(name: str) -> None:
    """Every awkward block, plus the signed-zero blocks where gguf-py's numpy port differs from C."""
    zeros = [
        torch.full((32,), -0.0),  # C keeps max = +0.0, so d = +0 / -8 = -0.0; gguf-py stores +0.0 here
        torch.cat([torch.tensor([-0.0]), torch.zeros(31)]),  # first of equal minima is -0.0 (q4_1's m)
        torch.cat([torch.tensor([0.0]), torch.full((31,), -0.0)]),
        torch.cat([torch.tensor([-0.0, 0.0]), torch.rand(30, generator=torch.Generator().manual_seed(3))]),
    ]
    w = torch.cat([_awkward_blocks(), torch.stack(zeros)])
    ours = FUNCS[name][0](w)
    for row in range(w.shape[0]):
        assert ours[row].tolist() == _c_ref(name, w[row].numpy()), (name, row)


def test_c_transcription_agrees_with_gguf_on_random_blocks() -> None:
    """The scalar transcription is itself checked against gguf-py where they agree (no signed zeros)."""
    w = _random_weights(7)[:6, :64]
    for name in TYPES:
        ref = quants.quantize(w.numpy(), _gtype(name)).view(np.uint8).reshape(-1, ggml_format(name).type_size)
        blocks = w.reshape(-1, 32).numpy()
        for i in range(blocks.shape[0]):
            assert ref[i].tolist() == _c_ref(name, blocks[i]), (name, i)


def test_q8_0_rounds_halves_away_from_zero() -> None:
    w = torch.cat([torch.tensor([127.0, 2.5, -2.5, 0.5, -0.5, 3.5]), torch.zeros(26)]).reshape(1, 32)
    codes = quantize_q8_0(w)[0, 2:8].view(torch.int8).tolist()
    assert codes == [127, 3, -3, 1, -1, 4]  # torch.round would give 2, -2, 0, -0, 4


def test_layout_of_one_q5_1_block() -> None:
    """d, m, qh (bit i = bit 4 of code i), then weight j in the low and j + 16 in the high nibble."""
    w = torch.arange(32, dtype=torch.float32).reshape(1, 32)  # min 0, max 31: d = 1, code i = i
    b = quantize_q5_1(w)[0]
    assert b[:2].view(torch.float16).item() == 1.0 and b[2:4].view(torch.float16).item() == 0.0
    assert int.from_bytes(bytes(b[4:8].tolist()), "little") == 0xFFFF0000
    assert b[8:].tolist() == [(j & 0xF) | (((j + 16) & 0xF) << 4) for j in range(16)]


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q4_0(torch.zeros(2, 40))
    with pytest.raises(ValueError, match="n_blocks"):
        dequantize_q4_0(torch.zeros(2, 20, dtype=torch.uint8))


# ---- registry -------------------------------------------------------------------------------------


def test_registry() -> None:
    for name in TYPES:
        fmt = FORMATS[_gtype(name)]
        assert (fmt.block_size, fmt.bits_per_weight) == (32, BITS[name])
        assert ggml_format(name) is fmt and ggml_format(name.upper()) is fmt
        assert METHODS[name].bits == BITS[name] and METHODS[name].linear_cls is GGMLLinear
    with pytest.raises(ValueError, match="already registered"):
        register_format(GGMLQuantizationType.Q4_0, quantize_q4_0, dequantize_q4_0)
    with pytest.raises(ValueError, match="no quantbench implementation"):
        ggml_format("IQ2_XXS")


# ---- the Linear -----------------------------------------------------------------------------------

# Unit roundoff of each compute dtype: the weight, the input and the bias are each rounded once to it,
# the fp32-accumulated sum is rounded once more at the end.
_UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("compute", ["fp16", "bf16", "fp32"])
def test_linear_forward_matches_float64(name: str, compute: str) -> None:
    torch.manual_seed(TYPES.index(name))
    linear = torch.nn.Linear(128, 40, bias=True)
    q = GGMLLinear.from_linear(linear, parse_spec(f"{name}:compute={compute}"))
    assert q.ggml_type == _gtype(name)
    assert torch.equal(q.blocks, FUNCS[name][0](linear.weight))
    w64 = FUNCS[name][1](q.blocks).double()
    x = torch.randn(5, 128)
    ref = x.double() @ w64.T + linear.bias.double()
    out = q(x)
    assert out.dtype == torch.float32 and out.shape == (5, 40)
    # Each product x*w carries the rounding of x and of w to the compute dtype (2u), the bias its own
    # (u); the fp32 sum of 129 terms adds at most 130 * 2**-24 of the absolute sum; the result is rounded
    # once to the compute dtype (u of |ref|, plus u of the error so far: the spare u below covers it and
    # a second rounding should a backend round before adding the bias).
    u = _UNIT[q.compute_dtype]
    mag = x.double().abs() @ w64.abs().T + linear.bias.double().abs()
    bound = (3 * u + 130 * 2.0**-24) * mag + u * ref.abs()
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    assert q.dequantize().dtype == q.compute_dtype


def test_build_layer_of_a_given_type() -> None:
    """A layer can use another registered type than the method's (a per-tensor mix)."""
    linear = torch.nn.Linear(64, 8, bias=False)
    config = parse_spec("q4_0")
    q = GGMLLinear.from_linear(linear, config, ggml_type=GGMLQuantizationType.Q8_0)
    assert q.ggml_type == GGMLQuantizationType.Q8_0 and q.blocks.shape == (8, 2 * 34)
    assert torch.equal(q.blocks, quantize_q8_0(linear.weight))
    empty = GGMLLinear(64, 8, False, config, ggml_type="q5_1")
    assert empty.blocks.shape == (8, 2 * 24) and "Q5_1" in repr(empty)


def test_supports_explains_block_size() -> None:
    assert GGMLLinear.supports(torch.nn.Linear(96, 4), parse_spec("q4_1")) is None
    reason = GGMLLinear.supports(torch.nn.Linear(100, 4), parse_spec("q4_1"))
    assert reason is not None and "100" in reason and "block size 32" in reason
    with pytest.raises(ValueError, match="block size 32"):
        GGMLLinear(100, 4, False, parse_spec("q4_1"))
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 8))
    quantbench.quantize(model, "q8_0:skip=none")
    assert isinstance(model[0], GGMLLinear) and isinstance(model[1], torch.nn.Linear)
    assert "block size 32" in model.quantbench_skipped["1"]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("q4_0:block=64", "unknown option 'block'"),
        ("q4_0:compute=int8", "option 'compute' must be one of fp16, bf16, fp32"),
        ("q4_0:bits=4", "unknown option 'bits'"),
        ("q4_2", "unknown method 'q4_2'"),
    ],
)
def test_spec_errors(spec: str, match: str) -> None:
    with pytest.raises(QuantConfigError, match=match) as info:
        parse_spec(spec)
    assert "\n" not in str(info.value)


def test_spec_defaults() -> None:
    config = parse_spec("q5_1")
    assert config.spec == "q5_1:compute=fp16,skip=lm_head"
    assert config.compute_dtype == torch.float16


# ---- whole model ----------------------------------------------------------------------------------


def _tiny():
    from tinyqwen import tiny_model

    return tiny_model("qwen2.5-0.5b", vocab_size=512, spread=0.1)


def test_quantize_tiny_model_and_state_dict_roundtrip() -> None:
    model = _tiny()
    originals = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    quantbench.quantize(model, "q4_0")
    layers = [n for n, m in model.named_modules() if isinstance(m, GGMLLinear)]
    assert len(layers) == 2 * 7 and "lm_head" in model.quantbench_skipped
    for name in layers:
        assert torch.equal(model.get_submodule(name).blocks, quantize_q4_0(originals[name]))
    report = quantbench.weight_report(model)
    assert report.bits_per_weight == 4.5

    skeleton = _tiny()
    replace_with_empty(skeleton, model.quantbench_config, layers)
    skeleton.load_state_dict(model.state_dict())
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, skeleton(ids).logits)


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    model = _tiny()
    quantbench.quantize(model, "q5_1:compute=bf16")
    assert_checkpoint_roundtrip(model, tmp_path / "ckpt", GGMLLinear)


@pytest.mark.slow
def test_real_model_q8_0_matches_gguf_and_stays_close(fresh_real_model) -> None:
    model, tokenizer = fresh_real_model
    ids = tokenizer("Quantization trades accuracy for memory.", return_tensors="pt").input_ids
    name = "model.layers.0.mlp.down_proj"
    weight = model.get_submodule(name).weight.detach().clone()
    with torch.no_grad():
        dense = model(ids).logits.double()
    quantbench.quantize(model, "q8_0:compute=fp32")
    ref = quants.quantize(weight.numpy(), GGMLQuantizationType.Q8_0).view(np.uint8)
    np.testing.assert_array_equal(model.get_submodule(name).blocks.numpy(), ref)
    with torch.no_grad():
        logits = model(ids).logits.double()
    assert (logits - dense).norm() / dense.norm() < 0.02
