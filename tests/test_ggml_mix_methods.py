"""The k-quant methods and the Q4_K_M / Q5_K_M mixes as quantbench methods; llama.cpp itself as the reference."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

import quantbench
from quantbench.quant.apply import replace_with_empty
from quantbench.quant.ggml import FORMATS, GGMLLinear
from quantbench.quant.ggml_mix import mix_layer_type, use_more_bits


def _tiny():
    from tinyqwen import tiny_model

    return tiny_model("qwen2.5-0.5b", vocab_size=512, spread=0.1)


def _linears(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_m"])
def test_mix_quantizes_each_layer_to_its_llama_cpp_type(mix: str) -> None:
    model = _tiny()
    originals = _linears(model)
    quantbench.quantize(model, mix)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GGMLLinear)}
    assert set(layers) == set(originals)  # every Linear, the output included, as llama-quantize does
    n_layers = model.config.num_hidden_layers
    for name, module in layers.items():
        expected = mix_layer_type(mix, name, module.in_features, model.config)
        assert module.ggml_type == expected, name
        assert torch.equal(module.blocks, FORMATS[expected].quantize(originals[name])), name
    # Hidden size 896 is not a multiple of 256: the 896-wide rows fall back to 32-block types.
    assert layers["model.layers.0.self_attn.q_proj"].ggml_type.name == ("Q5_0" if mix == "q4_k_m" else "Q5_1")
    last = n_layers - 1
    assert use_more_bits(last, n_layers)
    down = layers[f"model.layers.{last}.mlp.down_proj"]
    assert down.ggml_type.name == ("Q6_K" if down.in_features % 256 == 0 else "Q8_0")
    assert layers[f"model.layers.{last}.self_attn.v_proj"].ggml_type.name == "Q8_0"  # Q6_K's fallback
    assert layers["lm_head"].ggml_type.name == "Q8_0"  # tied output, 896-wide rows


def test_mix_checkpoint_rebuilds_the_same_layers(tmp_path: Path) -> None:
    model = _tiny()
    quantbench.quantize(model, "q4_k_m")
    layers = [n for n, m in model.named_modules() if isinstance(m, GGMLLinear)]
    skeleton = _tiny()
    replace_with_empty(skeleton, model.quantbench_config, layers)
    skeleton.load_state_dict(model.state_dict())
    quantbench.save_quantized(model, None, tmp_path / "ckpt")
    loaded, _ = quantbench.load_quantized(tmp_path / "ckpt")
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        assert torch.equal(ref, skeleton(ids).logits)
        assert torch.equal(ref, loaded(ids).logits)


@pytest.mark.parametrize("method", ["q4_k", "q5_k", "q6_k"])
def test_single_k_quant_methods_skip_rows_not_a_multiple_of_256(method: str, tiny_model) -> None:
    model = tiny_model  # Qwen2.5-0.5B's shapes: 896-wide rows, 4864-wide ffn_down rows
    quantbench.quantize(model, method)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GGMLLinear)}
    assert set(layers) == {f"model.layers.{i}.mlp.down_proj" for i in range(model.config.num_hidden_layers)}
    assert "multiple of" in model.quantbench_skipped["model.layers.0.self_attn.q_proj"]


# ---- llama.cpp itself: llama-quantize of our f16 export is byte for byte our mix ------------------------------

_FTYPES = {"q4_k_m": 15, "q5_k_m": 17, "q8_0": 7, "q4_0": 2}


def _llama_quantize(src: Path, dst: Path, method: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _FTYPES[method]
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "gemma3-270m"])
@pytest.mark.parametrize("method", ["q4_k_m", "q8_0"])
def test_llama_quantize_writes_our_bytes(name: str, method: str, tmp_path: Path) -> None:
    """f16 GGUF of the packaged model -> llama.cpp's llama_model_quantize -> read back with gguf: every tensor
    has our type and our bytes."""
    import gguf

    from quantbench.gguf_export import export_gguf

    pytest.importorskip("llama_cpp")
    model, _ = quantbench.load_model(name, dtype="fp16")
    f16 = export_gguf(model, tmp_path / "f16.gguf")
    _llama_quantize(f16, tmp_path / "llama.gguf", method)
    quantbench.quantize(model, method if method != "q8_0" else "q8_0:skip=none")
    ours = export_gguf(model, tmp_path / "ours.gguf")
    theirs = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "llama.gguf")).tensors}
    mine = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    assert set(theirs) == set(mine)
    for tensor_name, ref in theirs.items():
        got = mine[tensor_name]
        assert got.tensor_type == ref.tensor_type, tensor_name
        assert np.array_equal(np.asarray(got.data).view(np.uint8), np.asarray(ref.data).view(np.uint8)), tensor_name
