"""llama.cpp (GGML) formats on the engine's Triton kernels (``engine/kernels/ggml_layout.py``,
``kernels/offsets.py``).

CPU: every type's blocks, converted to the kernels' layout, give by the layout's formula in torch
(``layout_weights``) the float32 weights of llama.cpp's dequantization (gguf-py's ``dequantize`` and our
own) bit for bit, for quantized weights with awkward blocks and for random bytes (any code, scale and
minimum), row-major and tile-major; the converted copy follows the blocks; the engine fuses GGML layers
of one type only; the CPU engine on GGML models gives HF's greedy tokens.

Interpreter (``TRITON_INTERPRET=1``, in its own process, fp16: the interpreter's bf16 ``tl.dot`` is wrong):
the kernels on the converted layouts against the float64 product of llama.cpp's weights (relative error
below 1e-2, as the other weight-only kernels in test_kernels.py); the prompt slab kernel computes llama.cpp's
float32 weights bit for bit.

CUDA: each type at 1, 4, 16, 64 and 300 tokens in fp16 and bf16 (the HF forward's dispatch, the engine's
split-K partials, the SiLU-gated input) against the float64 product; the engine on tiny q4_0 / q4_k_m /
q6_k models gives the greedy tokens of HF's forward on the reference path.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

import quantbench
from quantbench.engine.kernels import layout_for
from quantbench.engine.kernels.ggml_layout import layout_weights, supported_types
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions
from quantbench.quant import parse_spec
from quantbench.quant.apply import eligible_linears, replace_with_empty
from quantbench.quant.ggml import FORMATS, GGMLLinear, random_blocks

T = GGMLQuantizationType
CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(
    CUDA or not HAS_TRITON or not IN_INTERPRETER, reason="runs inside test_interpreter_tests_in_own_process"
)

TYPES = list(supported_types())
OFFSET_TYPES = [T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K]  # w = d * q - m: layouts with GroupOffsets


def _name(t: GGMLQuantizationType) -> str:
    return t.name.lower()


# byte offsets of the fp16 fields (d, and m / dmin) in one block of each type
FP16_FIELDS = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q5_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_1: (0, 2),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}


def _random_bytes(
    t: GGMLQuantizationType, rows: int, k: int, seed: int, rms: float | None = None
) -> torch.Tensor:
    """Blocks of random bytes (every code, 6-bit scale / minimum and int8 scale pattern) with finite fp16
    fields of both signs; ``rms``: each row's fp16 fields scaled so that its weights have about that RMS."""
    bs, ts = GGML_QUANT_SIZES[t]
    gen = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 256, (rows, k // bs, ts), generator=gen, dtype=torch.uint8)
    for off in FP16_FIELDS[t]:
        vals = (torch.randn(rows, k // bs, 1, generator=gen) * 0.01).to(torch.float16)
        b[..., off : off + 2] = vals.view(torch.uint8)
    if rms is not None:  # the weights are linear in the fp16 fields (d, and m / dmin)
        factor = rms / _llama_weights(t, b.reshape(rows, -1)).pow(2).mean(1).sqrt().clamp_min(1e-30)
        for off in FP16_FIELDS[t]:
            field = b[..., off : off + 2].contiguous().view(torch.float16).float()
            b[..., off : off + 2] = (field * factor[:, None, None]).to(torch.float16).view(torch.uint8)
    return b.reshape(rows, -1)


def _awkward_weight(rows: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=gen) * 0.02
    w[0, :256] = 0.0  # all-zero blocks
    w[1, :256] = 0.5  # constant blocks
    w[2] *= 300.0  # a large row
    w[3, 7] = 40.0  # one outlier
    w[4] = -w[4].abs()  # negative only
    w[5] *= 1e-6  # scales in fp16's subnormal range
    w[6, :32] = torch.tensor([1.0, -1.0] * 16)  # equal magnitudes of both signs
    return w


def _module(t: GGMLQuantizationType, blocks: torch.Tensor, k: int, compute: str = "fp16", bias=None):
    cfg = parse_spec("q8_0", overrides={"compute": compute})
    module = GGMLLinear(k, blocks.shape[0], bias is not None, cfg, ggml_type=t)
    with torch.no_grad():
        module.blocks.copy_(blocks)
        if bias is not None:
            module.bias.copy_(bias)
    return module


def _llama_weights(t: GGMLQuantizationType, blocks: torch.Tensor) -> torch.Tensor:
    """float32 [rows, k]: gguf-py's dequantization (llama.cpp's dequantize_row_*)."""
    out = gguf_dequantize(blocks.cpu().numpy(), t)
    return torch.from_numpy(out).reshape(blocks.shape[0], -1)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach(), ref.detach()
    assert bool(torch.isfinite(out).all()), "output has unwritten (NaN) or non-finite entries"
    return float((out.double() - ref.double()).norm() / ref.double().norm())


# ------------------------------------------------------------------------------------------------------
# CPU


@functools.cache
def _quantized_awkward(t: GGMLQuantizationType, rows: int, k: int) -> torch.Tensor:
    return FORMATS[t].quantize(_awkward_weight(rows, k, seed=rows))


@pytest.mark.parametrize("t", TYPES, ids=_name)
@pytest.mark.parametrize("rows", [48, 40])  # 48: stored tile-major (16-row GEMV tiles); 40: row-major
def test_layout_gives_llama_cpp_weights(t: GGMLQuantizationType, rows: int) -> None:
    k = 512
    quantized = _quantized_awkward(t, 48, k)[:rows]
    for blocks in (quantized, _random_bytes(t, rows, k, seed=rows)):
        layout = layout_for(_module(t, blocks, k))
        assert layout is not None
        if rows % 16:
            assert layout.tile_n == 0
        elif DEFAULT_OPTIONS.mma and DEFAULT_OPTIONS.mma_batch1:
            assert layout.tile_n == 16
        ours = layout_weights(layout)
        ref = _llama_weights(t, blocks)
        assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))  # bit for bit, signed zeros too
        assert torch.equal(ours.view(torch.int32), FORMATS[t].dequantize(blocks).view(torch.int32))


def test_layout_bits_and_offsets() -> None:
    """Which types carry offsets; fp16 scales where llama.cpp stores them, float32 products for k-quants."""
    for t in TYPES:
        layout = layout_for(_module(t, random_blocks(t, 16, 256, pool=8), 256))
        assert (layout.offsets is not None) == (t in OFFSET_TYPES)
        assert layout.scales.dtype == (torch.float32 if t in (T.Q4_K, T.Q5_K, T.Q6_K) else torch.float16)
        assert layout.bits == (4 if t in (T.Q4_0, T.Q4_1, T.Q4_K) else 8)
        assert layout.group == (16 if t == T.Q6_K else 32)


def test_converted_copy_follows_the_blocks() -> None:
    k = 256
    a, b = (random_blocks(T.Q4_K, 16, k, seed=s, pool=8) for s in (1, 2))
    module = _module(T.Q4_K, a, k)
    first = layout_for(module)
    assert layout_for(module) is first  # cached
    module.load_state_dict({"blocks": b})  # in place: the cached copy is dropped
    assert torch.equal(layout_weights(layout_for(module)), _llama_weights(T.Q4_K, b))
    assert torch.equal(module.blocks, b)  # llama.cpp's bytes stay, for export


def test_no_layout_for_fp32_compute() -> None:
    module = _module(T.Q4_0, random_blocks(T.Q4_0, 16, 64, pool=8), 64, compute="fp32")
    assert layout_for(module) is None  # the kernels take fp16 / bf16: the reference forward runs


def test_engine_fuses_ggml_layers_of_one_type_only() -> None:
    from quantbench.engine.model import fuse_linears

    k = 256
    q, kp = (_module(T.Q4_K, random_blocks(T.Q4_K, n, k, seed=n, pool=8), k) for n in (64, 32))
    v = _module(T.Q6_K, random_blocks(T.Q6_K, 32, k, pool=8), k)
    assert fuse_linears([q, kp, v]) == [q, kp, v]  # a q4_k_m layer whose v is q6_k: not fused
    expect = torch.cat([q.dequantize(), kp.dequantize()])
    (fused,) = fuse_linears([q, kp])
    assert isinstance(fused, GGMLLinear) and fused.ggml_type == T.Q4_K and fused.out_features == 96
    assert torch.equal(fused.dequantize(), expect)
    assert q.blocks.data_ptr() == fused.blocks.data_ptr()  # the parts are views of the fused blocks


def ggml_random_model(
    model, spec: str, std: float = 0.02, head_std: float | None = None, seed: int = 0, pool: int = 64
):
    """``model`` with every Linear the spec quantizes replaced by a GGML layer of its type (a mix picks them
    per layer) holding random blocks (``random_blocks``: no quantizer run over the whole model)."""
    config = parse_spec(spec)
    names = [name for name, _, reason in eligible_linears(model, config) if reason is None]
    biases = {n: model.get_submodule(n).bias for n in names}
    replace_with_empty(model, config, names)
    for i, name in enumerate(names):
        m = model.get_submodule(name)
        scale = head_std if head_std is not None and name.endswith("lm_head") else std
        with torch.no_grad():
            m.blocks.copy_(random_blocks(m.ggml_type, m.out_features, m.in_features, scale, seed + i, pool))
            if biases[name] is not None:
                m.bias.copy_(biases[name])
    model.quantbench_config = config
    return model


def _tiny(arch: str, dtype: str = "fp32", device: str = "cpu"):
    extra = {"head_dim": 64} if arch != "qwen2.5-0.5b" else {}
    model = quantbench.random_model(
        arch, dtype=dtype, device=device, num_hidden_layers=2, vocab_size=256, hidden_size=256,
        intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, **extra,
    )  # fmt: skip
    model.generation_config.eos_token_id = None
    return model


def _hf_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("arch", ["qwen2.5-0.5b", "llama-3-8b"])
def test_cpu_engine_on_q4_k_m_matches_hf_generate(arch: str) -> None:
    """The engine's layers (q/k/v fused where one type, apart where v is q6_k) give HF's greedy tokens."""
    from quantbench.engine import Engine

    # head std 0.6: decisive greedy choices (random weights give near-ties that summation order could flip)
    model = ggml_random_model(_tiny(arch), "q4_k_m:compute=fp32", head_std=0.6)
    types = {n: m.ggml_type for n, m in model.named_modules() if isinstance(m, GGMLLinear)}
    assert (
        types["model.layers.0.self_attn.v_proj"] == T.Q4_K
        and types["model.layers.1.self_attn.v_proj"] == T.Q6_K
    )
    engine = Engine(model)
    assert len(engine.em.layers[0].qkv.modules) == 1 and len(engine.em.layers[1].qkv.modules) == 3
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    out = engine.generate(ids, max_new_tokens=8, ignore_eos=True)
    assert torch.equal(out, _hf_greedy(model, ids, 8))


# ------------------------------------------------------------------------------------------------------
# CPU, Triton interpreter


def _case(t: GGMLQuantizationType, n: int, k: int, device: str, dtype: torch.dtype, seed: int = 0):
    """A layer of ``t`` (blocks of random weights, plus awkward and random-byte rows, every row of about the
    same RMS so that none dominates the relative error) with a bias, its kernel layout and llama.cpp's
    weights (float64)."""
    rows = min(n, 8)
    awkward = _awkward_weight(rows, k, seed)
    awkward = awkward * (0.02 / awkward.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-30))
    blocks = torch.cat(
        [
            FORMATS[t].quantize(awkward),
            _random_bytes(t, rows, k, seed, rms=0.02),
            random_blocks(t, n - 2 * rows, k, seed=seed, pool=64),
        ]
    )
    bias = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.1
    compute = "bf16" if dtype == torch.bfloat16 else "fp16"
    module = _module(t, blocks, k, compute=compute, bias=bias).to(device)
    return module, layout_for(module), _llama_weights(t, blocks).double().to(device)


def _ref(x: torch.Tensor, w: torch.Tensor, module) -> torch.Tensor:
    return x.double() @ w.t() + module.bias.double()


@interp
@pytest.mark.parametrize("t", TYPES, ids=_name)
def test_kernels_on_converted_layout_interpreter(t: GGMLQuantizationType) -> None:
    from quantbench.engine.kernels import linear

    module, layout, w = _case(t, 48, 256, "cpu", torch.float16, seed=len(t.name))
    for m in (1, 5):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).half()
        out = torch.full((m, 48), float("nan"), dtype=torch.float16)
        linear(layout, x, out=out)
        assert _rel(out, _ref(x, w, module)) < 1e-2, m


@interp
@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K], ids=_name)
def test_silu_gated_input_interpreter(t: GGMLQuantizationType) -> None:
    """The down projection reads silu(gate) * up from a gate/up output (offsets subtracted from that)."""
    from quantbench.engine.kernels import linear
    from quantbench.engine.kernels.fused import silu_mul

    module, layout, w = _case(t, 32, 256, "cpu", torch.float16)
    gate_up = torch.randn(3, 512, generator=torch.Generator().manual_seed(3)).half()
    out = linear(layout, gate_up, act_silu_mul=True)
    assert _rel(out, _ref(silu_mul(gate_up), w, module)) < 1e-2


@interp
@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K], ids=_name)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prompt_slabs_hold_llama_cpp_weights_interpreter(t: GGMLQuantizationType, dtype: torch.dtype) -> None:
    """Long prompts: the slab kernel computes llama.cpp's float32 weights, offsets included (each operation
    rounded apart, as in C; checked in a float32 slab: the interpreter's bf16 cast truncates), then the
    product over slabs of the compute dtype (two slabs for 80 rows)."""
    from quantbench.engine.kernels import dequant as dq

    module, layout, w = _case(t, 80, 256, "cpu", dtype)
    slab = torch.full((80, 256), float("nan"), dtype=torch.float32)
    dq.dequantize_rows(layout, 0, 80, slab)
    assert torch.equal(slab.view(torch.int32), w.float().view(torch.int32))
    x = torch.randn(70, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    slabs = EngineOptions(slab_elems=64 * 256, eager_slab_elems=0)  # 64-row L2 slabs: two for 80 rows
    assert _rel(dq.dense_matmul(x, layout, options=slabs), _ref(x, w, module)) < 1e-2


@interp
@pytest.mark.parametrize("t", [T.Q4_K, T.Q5_1], ids=_name)
def test_prompt_gemm_with_offsets_interpreter(t: GGMLQuantizationType) -> None:
    """Prompts up to the fused GEMM's limit: its float32 product, then the offset term subtracted (split-K,
    a partial last token tile, row tiles not dividing N)."""
    from quantbench.engine.kernels.offsets import subtract_offsets
    from quantbench.engine.kernels.prompt_gemm import prompt_gemm

    module, layout, w = _case(t, 80, 256, "cpu", torch.float16)
    x = torch.randn(70, 256, generator=torch.Generator().manual_seed(2)).half()
    acc = torch.full((70, 80), float("nan"), dtype=torch.float32)
    prompt_gemm(x, layout, out=acc, config={"BM": 32, "BN": 64, "BK": 64, "SPLIT_K": 2, "PREFETCH": 1})
    assert _rel(subtract_offsets(layout, x, acc), _ref(x, w, module)) < 1e-2


@pytest.mark.skipif(CUDA or not HAS_TRITON or IN_INTERPRETER, reason="CPU with triton installed")
def test_interpreter_tests_in_own_process() -> None:
    """The interpreter tests above, in a fresh process with TRITON_INTERPRET=1 set before any import."""
    from triton_interp import run_interpreter_tests

    run_interpreter_tests(__file__, timeout=1800)


# ------------------------------------------------------------------------------------------------------
# CUDA

_CUDA_CASES: dict = {}


def _cuda_case(t: GGMLQuantizationType, dtype: torch.dtype, n: int = 1024, k: int = 4096):
    key = (t, dtype, n, k)
    if key not in _CUDA_CASES:
        _CUDA_CASES[key] = _case(t, n, k, "cuda", dtype, seed=7)
    return _CUDA_CASES[key]


@pytest.mark.cuda
@pytest.mark.parametrize("t", TYPES, ids=_name)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 4, 16, 64, 300])
def test_ggml_kernels_cuda(t: GGMLQuantizationType, dtype: torch.dtype, m: int) -> None:
    """The HF forward's kernel path (``dispatch``) and the engine's ``linear`` with a NaN-poisoned output:
    tensor-core GEMV (1-16 tokens, tile-major codes), fused prompt GEMM (64), slabs + cuBLAS (300)."""
    from quantbench.engine.kernels import dispatch, linear

    module, layout, w = _cuda_case(t, dtype)
    assert layout.tile_n == 16
    x = torch.randn(m, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(m)).to(dtype)
    ref = _ref(x, w, module)
    out = dispatch(module, x.reshape(1, m, 4096))
    assert out is not None and out.shape == (1, m, 1024)
    assert _rel(out[0], ref) < 1e-2
    poisoned = torch.full((m, 1024), float("nan"), device="cuda", dtype=dtype)
    linear(layout, x, out=poisoned)
    assert _rel(poisoned, ref) < 1e-2
    assert _rel(module(x), ref) < 1e-2  # GGMLLinear.forward on CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("t", TYPES, ids=_name)
@pytest.mark.parametrize("m", [1, 8, 16])
def test_ggml_partials_and_silu_cuda(t: GGMLQuantizationType, m: int) -> None:
    """The decode step's split-K partials (offsets subtracted in their first plane) and the SiLU-gated input
    of the down projection."""
    from quantbench.engine.kernels import linear
    from quantbench.engine.kernels.fused import silu_mul
    from quantbench.engine.kernels.partials import Partials

    module, layout, w = _cuda_case(t, torch.bfloat16)
    x = torch.randn(m, 4096, device="cuda").to(torch.bfloat16)
    res = linear(layout, x, partials=True)
    assert isinstance(res, Partials)
    assert _rel(res.sum(), _ref(x, w, module)) < 1e-2
    gate_up = torch.randn(m, 8192, device="cuda").to(torch.bfloat16)
    assert _rel(linear(layout, gate_up, act_silu_mul=True), _ref(silu_mul(gate_up), w, module)) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K], ids=_name)
@pytest.mark.parametrize("m", [1, 4, 37])
def test_ggml_row_major_cuda(t: GGMLQuantizationType, m: int) -> None:
    """Rows not a multiple of 16: codes stay row-major and the tensor-core GEMV does not take them (half2
    GEMV at one token, ``wq_matmul`` otherwise)."""
    from quantbench.engine.kernels import linear

    module, layout, w = _cuda_case(t, torch.bfloat16, n=1000, k=2048)
    assert layout.tile_n == 0
    x = torch.randn(m, 2048, device="cuda").to(torch.bfloat16)
    out = torch.full((m, 1000), float("nan"), device="cuda", dtype=torch.bfloat16)
    linear(layout, x, out=out)
    assert _rel(out, _ref(x, w, module)) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("spec", ["q4_0", "q4_k_m", "q6_k"])
@pytest.mark.parametrize("arch", ["qwen2.5-0.5b", "llama-3-8b"])
def test_engine_on_ggml_model_matches_hf_reference_cuda(spec: str, arch: str, monkeypatch) -> None:
    """Engine (Triton kernels, CUDA graphs) against HF generate with every GGML layer on its reference
    forward (dequantize + matmul), fp16."""
    from quantbench.engine import Engine
    from quantbench.quant import base

    model = ggml_random_model(_tiny(arch, "fp16", "cuda"), f"{spec}:skip=none", head_std=0.6)
    ids = torch.randint(0, 256, (3, 11), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    engine = Engine(model)
    assert "Triton" in engine.path
    out = engine.generate(ids, max_new_tokens=8, ignore_eos=True)
    monkeypatch.setattr(base, "_kernel_forward", None)  # HF forward: every layer on its reference path
    assert torch.equal(out, _hf_greedy(model, ids, 8))
