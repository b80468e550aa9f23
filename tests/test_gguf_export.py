"""GGUF export: llama.cpp's tensor layout, read back by transformers' GGUF loader and loaded by llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantbench.gguf_export import GGUFExportError, export_gguf, file_type, permute_rope_rows


@pytest.mark.parametrize(("n_head", "n_kv"), [(14, 2), (8, 8), (4, 1)])
def test_rope_permutation_is_the_inverse_of_transformers(n_head: int, n_kv: int) -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    head_dim, hidden = 16, 24
    processor = LlamaTensorProcessor(config={"num_attention_heads": n_head, "num_key_value_heads": n_kv})
    rng = np.random.default_rng(0)
    q = rng.standard_normal((n_head * head_dim, hidden)).astype(np.float32)
    k = rng.standard_normal((n_kv * head_dim, hidden)).astype(np.float32)
    q_back = processor.process(permute_rope_rows(q, n_head), "blk.0.attn_q.weight").weights
    k_back = processor.process(permute_rope_rows(k, n_kv), "blk.0.attn_k.weight").weights
    assert np.array_equal(q_back, q) and np.array_equal(k_back, k)
    # Rows of quantized blocks (bytes) move the same way.
    blocks = rng.integers(0, 256, (n_kv * head_dim, 34), dtype=np.uint8)
    assert sorted(map(bytes, permute_rope_rows(blocks, n_kv))) == sorted(map(bytes, blocks))


def test_model_without_gguf_source_is_refused(tiny_model, tmp_path) -> None:
    with pytest.raises(GGUFExportError, match="needs a model converted from a GGUF file"):
        export_gguf(tiny_model, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_methods_without_llama_cpp_type_are_refused(tiny_model) -> None:
    import quantbench

    quantbench.quantize(tiny_model, "nf4")
    with pytest.raises(GGUFExportError, match="nf4 has no llama.cpp type"):
        file_type(tiny_model)


def _export_and_read_back(name: str, tmp_path):
    from transformers import AutoModelForCausalLM

    import quantbench

    model, tokenizer = quantbench.load_model(name, dtype="fp16")
    path = export_gguf(model, tmp_path / f"{name}.gguf")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer, back, path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "gemma3-270m"])
def test_f16_export_reads_back_in_transformers_exactly(name: str, tmp_path) -> None:
    """Every weight comes back bit for bit (Gemma's norms go through 1 + w and back)."""
    model, _, back, _ = _export_and_read_back(name, tmp_path)
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) <= set(theirs)
    for key, value in ours.items():
        assert torch.equal(value.float(), theirs[key].float()), key


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "gemma3-270m"])
def test_llama_cpp_loads_the_export_and_agrees_on_next_token(name: str, tmp_path) -> None:
    """llama.cpp's next-token log-probs on the exported f16 file match ours (fp32 math on the same fp16
    weights). llama.cpp rounds activations to fp16 before its f16 matmuls, so they differ by that rounding:
    the same top token and log-probs within 0.1 nats on the 20 most likely tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import quantbench

    model, tokenizer = quantbench.load_model(name, dtype="fp32")
    model16, _ = quantbench.load_model(name, dtype="fp16")
    path = export_gguf(model16, tmp_path / f"{name}.gguf")
    model.load_state_dict({k: v.float() for k, v in model16.state_dict().items()})  # the same weights
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)
    prompts = ["The capital of France is", "def fibonacci(n):", "In the beginning God created"]
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            ours = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
        llm.reset()
        llm.eval(ids)
        theirs = torch.log_softmax(torch.tensor(np.array(llm.scores[len(ids) - 1]), dtype=torch.float64), -1)
        top = ours.topk(20).indices
        assert int(theirs.argmax()) == int(ours.argmax()), prompt
        assert float((ours[top] - theirs[top]).abs().max()) < 0.1, prompt
