"""llama.cpp's k-quants (q4_K, q5_K, q6_K) and the Q4_K_M / Q5_K_M per-tensor type choice."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from ggml_ref import GGML_MISSING, load_ggml
from quantbench.quant.ggml_kquants import (
    KQUANT_FUNCTIONS,
    dequantize_q4_k,
    quantize_q4_k,
    quantize_q6_k,
)
from quantbench.quant.ggml_mix import ggml_mix_plan, ggml_mix_type, hf_to_gguf_name, use_more_bits

T = GGMLQuantizationType
KTYPES = [T.Q4_K, T.Q5_K, T.Q6_K]


def awkward_weight(seed: int, rows: int = 24, cols: int = 512) -> torch.Tensor:
    """Gaussian rows plus the cases the C code branches on: zero rows and sub-blocks, constant rows,
    all-positive rows, single outliers, heavy tails, tiny values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0] = 0
    w[1, :40] = 0
    w[2, 10] = 3.0
    w[3] = -0.2
    w[4] = 0.2
    w[5, 256:] = 0.3
    w[6, :300] *= 1e-6
    w[7:10] = torch.rand(3, cols, generator=g)
    w[10:14] *= torch.rand(4, cols, generator=g).pow(8) * 50
    w[14, ::16] = 0  # one exact zero per 16-value sub-block
    return w


@pytest.mark.parametrize("qtype", KTYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf(qtype: GGMLQuantizationType) -> None:
    quantize, dequantize = KQUANT_FUNCTIONS[qtype]
    w = awkward_weight(0)
    blocks = quantize(w)
    block, type_size = GGML_QUANT_SIZES[qtype]
    assert blocks.dtype == torch.uint8 and blocks.shape == (w.shape[0], w.shape[1] // block * type_size)
    ours = dequantize(blocks)
    theirs = torch.from_numpy(gguf_dequantize(blocks.numpy(), qtype))
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)


@pytest.mark.parametrize(("qtype", "max_rel_rmse"), [(T.Q4_K, 0.12), (T.Q5_K, 0.06), (T.Q6_K, 0.03)])
def test_round_trip_error(qtype: GGMLQuantizationType, max_rel_rmse: float) -> None:
    quantize, dequantize = KQUANT_FUNCTIONS[qtype]
    w = torch.randn(16, 1024, generator=torch.Generator().manual_seed(1)) * 0.02
    back = dequantize(quantize(w)).double()
    rel = ((back - w.double()).pow(2).mean() / w.double().pow(2).mean()).sqrt().item()
    assert rel < max_rel_rmse
    # one more bit roughly halves the error: the formats are not silently the same
    assert rel > max_rel_rmse / 8
    zero = torch.zeros(2, 256)
    assert torch.equal(dequantize(quantize(zero)), zero)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q4_k(torch.zeros(4, 896))
    with pytest.raises(ValueError, match="block bytes"):
        dequantize_q4_k(torch.zeros(4, 100, dtype=torch.uint8))


# ------------------------------------------------------------------------ bit-exactness vs llama.cpp


def assert_same_blocks(ours: torch.Tensor, theirs: torch.Tensor, qtype: GGMLQuantizationType) -> None:
    type_size = GGML_QUANT_SIZES[qtype][1]
    bad = (ours.reshape(-1, type_size) != theirs.reshape(-1, type_size)).any(1)
    assert not bad.any(), f"{qtype.name}: {int(bad.sum())} of {bad.numel()} blocks differ from llama.cpp's"


@pytest.mark.parametrize("qtype", KTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bytes_equal_llama_cpp(qtype: GGMLQuantizationType, seed: int) -> None:
    ref = load_ggml()
    if ref is None:
        pytest.skip(GGML_MISSING)
    w = awkward_weight(seed)
    assert_same_blocks(KQUANT_FUNCTIONS[qtype][0](w), ref.quantize(qtype, w), qtype)


@pytest.fixture(scope="module")
def packaged_gguf(tmp_path_factory: pytest.TempPathFactory):
    """GGUFReader of each packaged model (its chunks joined into one temporary file), by name."""
    from quantbench.errors import ModelLoadError
    from quantbench.models import PACKAGED_MODELS, packaged_chunks

    folder = tmp_path_factory.mktemp("packaged_gguf")
    readers: dict[str, GGUFReader] = {}

    def get(name: str) -> GGUFReader:
        if name not in readers:
            try:
                chunks = packaged_chunks(PACKAGED_MODELS[name])
            except ModelLoadError as exc:
                pytest.skip(str(exc))
            path = Path(folder) / f"{name}.gguf"
            with path.open("wb") as out:
                for chunk in chunks:
                    with chunk.open("rb") as src:
                        shutil.copyfileobj(src, out, 1 << 22)
            readers[name] = GGUFReader(path)
        return readers[name]

    return get


def real_weight(reader: GGUFReader, name: str, rows: int) -> torch.Tensor:
    tensor = next(t for t in reader.tensors if t.name == name)
    cols = int(tensor.shape[0])
    values = gguf_dequantize(tensor.data, tensor.tensor_type).reshape(-1, cols)[:rows]
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


@pytest.mark.parametrize(
    "tensor_name",
    ["blk.0.ffn_down.weight", "blk.2.ffn_down.weight"],  # stored as Q6_K and Q4_K
)
def test_bytes_equal_llama_cpp_on_real_tensors(packaged_gguf, tensor_name: str) -> None:
    ref = load_ggml()
    if ref is None:
        pytest.skip(GGML_MISSING)
    w = real_weight(packaged_gguf("qwen2.5-coder-0.5b"), tensor_name, rows=48)
    for qtype in KTYPES:
        assert_same_blocks(KQUANT_FUNCTIONS[qtype][0](w), ref.quantize(qtype, w), qtype)


# ------------------------------------------------------------------------------ per-tensor type mix


@pytest.mark.parametrize(
    ("model", "order"),
    # the Qwen file was made by an older llama-quantize that visited tensors in file order
    # (blk.0, blk.1, blk.10, ...), the Gemma file by one that sorts them by layer
    [("qwen2.5-coder-0.5b", "file"), ("gemma3-270m", "layer")],
)
def test_mix_reproduces_packaged_q4_k_m(packaged_gguf, model: str, order: str) -> None:
    reader = packaged_gguf(model)
    plan = ggml_mix_plan("q4_k_m", [(t.name, list(t.shape)) for t in reader.tensors], order=order)
    stored = {t.name: t.tensor_type for t in reader.tensors}
    quantized = {name for name, qtype in stored.items() if qtype not in (T.F32, T.F16)}
    assert set(plan) == quantized
    wrong = {name: (plan[name].name, stored[name].name) for name in plan if plan[name] != stored[name]}
    assert not wrong, f"(ours, llama.cpp's): {wrong}"
    # the plan needs "file" order for the Qwen file: by layer it would differ
    if order == "file":
        by_layer = ggml_mix_plan("q4_k_m", [(t.name, list(t.shape)) for t in reader.tensors])
        assert by_layer != plan


def test_mix_rules() -> None:
    # Qwen2.5-0.5B shapes: hidden 896 is not a multiple of 256, ffn 4864 is
    assert [i for i in range(24) if use_more_bits(i, 24)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]
    kw = {"layer_index": 0, "n_layers": 24}
    assert ggml_mix_type("q4_k_m", "blk.0.attn_v", n_per_row=896, **kw) == T.Q8_0  # Q6_K -> fallback
    assert ggml_mix_type("q4_k_m", "blk.3.attn_v", n_per_row=896, layer_index=3, n_layers=24) == T.Q5_0
    assert ggml_mix_type("q5_k_m", "blk.3.attn_q", n_per_row=896, **kw) == T.Q5_1
    assert ggml_mix_type("q4_k_m", "blk.0.ffn_down", n_per_row=4864, **kw) == T.Q6_K
    assert ggml_mix_type("q4_k_m", "blk.3.ffn_down", n_per_row=4864, layer_index=3, n_layers=24) == T.Q4_K
    assert ggml_mix_type("q5_k_m", "blk.3.ffn_down", n_per_row=4864, layer_index=3, n_layers=24) == T.Q5_K
    assert ggml_mix_type("q4_k_s", "blk.2.ffn_down", n_per_row=4864, layer_index=2, n_layers=24) == T.Q5_K
    assert ggml_mix_type("q4_k_m", "blk.0.attn_q", n_per_row=4096, **kw) == T.Q4_K
    # output: Q6_K, or Q8_0 when the row is not a multiple of 256; a tied embedding is the output
    assert ggml_mix_type("q4_k_m", "output", n_per_row=4096) == T.Q6_K
    assert ggml_mix_type("q4_k_m", "output", n_per_row=896) == T.Q8_0
    assert ggml_mix_type("q4_k_m", "token_embd", n_per_row=4096) == T.Q4_K
    assert ggml_mix_type("q4_k_m", "token_embd", n_per_row=4096, has_output=False) == T.Q6_K
    assert ggml_mix_type("q5_k_s", "token_embd", n_per_row=640, has_output=False) == T.Q8_0
    assert ggml_mix_type("q4_k_m", "blk.0.attn_q", n_per_row=48, **kw) == T.F16  # not even 32
    with pytest.raises(ValueError, match="unknown mix"):
        ggml_mix_type("q3_k_m", "output", n_per_row=4096)


def test_hf_to_gguf_names() -> None:
    assert hf_to_gguf_name("model.layers.7.self_attn.v_proj") == "blk.7.attn_v"
    assert hf_to_gguf_name("model.layers.7.self_attn.o_proj.weight") == "blk.7.attn_output.weight"
    assert hf_to_gguf_name("model.layers.0.self_attn.q_proj.bias") == "blk.0.attn_q.bias"
    assert hf_to_gguf_name("model.layers.12.mlp.down_proj") == "blk.12.ffn_down"
    assert hf_to_gguf_name("model.layers.1.mlp.gate_proj") == "blk.1.ffn_gate"
    assert hf_to_gguf_name("lm_head") == "output"
    assert hf_to_gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert hf_to_gguf_name("model.layers.2.post_attention_layernorm", "qwen2") == "blk.2.ffn_norm"
    assert hf_to_gguf_name("model.layers.2.post_attention_layernorm", "gemma3") == "blk.2.post_attention_norm"
    assert hf_to_gguf_name("model.language_model.layers.3.mlp.up_proj") == "blk.3.ffn_up"
    assert hf_to_gguf_name("model.rotary_emb") is None


def test_mix_plan_names_from_hf_model(tiny_model) -> None:
    """Every nn.Linear of a (2-layer, Qwen-shaped) HF model maps to a GGUF name the plan types."""
    linears = {name: m for name, m in tiny_model.named_modules() if isinstance(m, torch.nn.Linear)}
    tensors = [
        (hf_to_gguf_name(name, "qwen2"), [m.in_features, m.out_features]) for name, m in linears.items()
    ]
    assert all(name is not None for name, _ in tensors)
    plan = ggml_mix_plan("q4_k_m", tensors)
    assert len(plan) == len(linears)
    # with 2 layers use_more_bits picks only the last one; 4864 columns take k-quants, 896 do not
    assert plan["blk.0.ffn_down.weight"] == T.Q4_K
    assert plan["blk.1.ffn_down.weight"] == T.Q6_K
    assert plan["blk.1.attn_v.weight"] == T.Q8_0
    assert plan["blk.0.attn_v.weight"] == plan["blk.0.ffn_up.weight"] == T.Q5_0


def test_quantize_q6_k_zero_block_is_all_zero_bytes() -> None:
    w = torch.zeros(1, 512)
    w[0, 300] = 1.0
    blocks = quantize_q6_k(w)
    assert not blocks[0, :210].any() and blocks[0, 210:].any()


@pytest.mark.parametrize("qtype", KTYPES, ids=lambda t: t.name)
def test_quantizing_in_slices_of_rows_changes_no_byte(qtype: GGMLQuantizationType) -> None:
    """Large tensors are quantized a slice of rows at a time (blocks are independent): slices of 1, 5 and
    all 24 rows write the bytes of one pass, which the llama.cpp comparison above checks."""
    quantize = KQUANT_FUNCTIONS[qtype][0]
    w = awkward_weight(3)
    whole = quantize(w, step_weights=w.numel())
    for rows in (1, 5):
        assert torch.equal(quantize(w, step_weights=rows * w.shape[1]), whole)
