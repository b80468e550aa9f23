"""The engine's generation path on CPU (pure-torch reference ops) against HF ``generate``, the HF
fallback for other architectures, and ``quantbench bench`` on a 2-layer random model."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch

import quantbench
from quantbench.bench.runner import split_methods
from quantbench.engine import Engine

SMALL = dict(
    num_hidden_layers=2, vocab_size=384, hidden_size=128, intermediate_size=256, num_attention_heads=4
)


def _decisive(model):
    """Scale the LM head so greedy choices have clear margins (random weights give near-ties that
    1e-7 differences in summation order could flip)."""
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.generation_config.eos_token_id = None  # HF's min_new_tokens would otherwise ban the EOS id
    return model


def _hf_greedy(model, ids, mask, n):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("arch", ["mistral-7b", "llama-3-8b", "qwen2.5-0.5b"])
def test_engine_greedy_matches_hf_generate(arch: str) -> None:
    torch.manual_seed(0)
    extra = {"head_dim": 32} if arch != "qwen2.5-0.5b" else {}
    model = _decisive(quantbench.random_model(arch, dtype="fp32", num_key_value_heads=2, **SMALL, **extra))
    ids = torch.randint(0, 384, (3, 11))
    mask = torch.ones_like(ids)
    engine = Engine(model)
    assert engine.path.startswith("engine")
    assert torch.equal(
        engine.generate(ids, max_new_tokens=9, ignore_eos=True), _hf_greedy(model, ids, mask, 9)
    )
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0
    assert torch.equal(
        engine.generate(ids, mask, max_new_tokens=9, ignore_eos=True), _hf_greedy(model, ids, mask, 9)
    )


def test_engine_quantized_model_matches_hf_generate() -> None:
    torch.manual_seed(1)
    model = _decisive(quantbench.random_model("qwen2.5-0.5b", dtype="fp32", num_key_value_heads=2, **SMALL))
    quantbench.quantize(model, "int4:group=32,compute=fp32")
    ids = torch.randint(0, 384, (2, 7))
    out = Engine(model).generate(ids, max_new_tokens=6, ignore_eos=True)
    assert torch.equal(out, _hf_greedy(model, ids, torch.ones_like(ids), 6))


def test_engine_sampling_and_eos() -> None:
    torch.manual_seed(2)
    model = quantbench.random_model("llama-3-8b", dtype="fp32", num_key_value_heads=2, head_dim=32, **SMALL)
    engine = Engine(model)
    ids = torch.randint(0, 384, (2, 5))
    a = engine.generate(ids, max_new_tokens=8, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, seed=5)
    b = engine.generate(ids, max_new_tokens=8, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, seed=5)
    assert torch.equal(a, b) and a.shape == (2, 8)
    greedy = engine.generate(ids, max_new_tokens=8, ignore_eos=True)
    eos = int(greedy[0, 2])
    stopped = engine.generate(ids, max_new_tokens=8, eos_token_id=eos)
    first = int((greedy[0] == eos).nonzero()[0])
    assert torch.equal(stopped[0, : first + 1], greedy[0, : first + 1])
    assert bool((stopped[0, first:] == eos).all())


def test_engine_falls_back_for_other_architectures() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=64, n_head=2, vocab_size=128, n_positions=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    engine = Engine(model)
    assert engine.em is None and "fallback" in engine.path and "gpt2" in engine.path
    ids = torch.randint(0, 128, (1, 4))
    out = engine.generate(ids, max_new_tokens=3, ignore_eos=True)
    assert out.shape == (1, 3) and "HF forward" in engine.last_path


def test_split_methods_keeps_spec_options_together() -> None:
    assert split_methods(["bf16,nf4:block=64,dq=1,int4", "int8:asym;fp8"]) == [
        "bf16",
        "nf4:block=64,dq=1",
        "int4",
        "int8:asym",
        "fp8",
    ]


def test_bench_command_cpu(tmp_path, capsys) -> None:
    from quantbench.cli import main

    db = tmp_path / "q.db"
    out = tmp_path / "rows.json"
    main(
        [
            "bench", "random:qwen2.5-0.5b:vocab_size=256,hidden_size=64,intermediate_size=128,num_attention_heads=4",
            "--methods", "fp32,int8:compute=fp32", "--batch", "1,2", "--input", "6", "--output", "3",
            "--device", "cpu", "--layers", "2", "--repeats", "1", "--db", str(db), "--json", str(out),
        ]
    )  # fmt: skip
    rows = json.loads(out.read_text())
    assert len(rows) == 4
    assert all(r["per_token_ms"] > 0 and r["first_token_ms"] > 0 and r["pct_bw"] >= 0 for r in rows)
    assert {r["batch"] for r in rows} == {1, 2}
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT spec, split, extra FROM runs WHERE task='bench'").fetchall()
    assert len(stored) == 4 and stored[0][1] == "b1-in6-out3"
    assert "copy bandwidth" in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["fp8", "llm.int8:threshold=2.0"])
def test_engine_fuses_w8a8_layers(spec: str) -> None:
    """q/k/v and gate/up of W8A8 layers run as one fused module each (one activation quantization, one
    GEMV), and generate what HF's per-module forwards generate."""
    from quantbench.quant.base import QuantLinear

    torch.manual_seed(3)
    model = _decisive(quantbench.random_model("qwen2.5-0.5b", dtype="fp32", num_key_value_heads=2, **SMALL))
    quantbench.quantize(model, spec)
    ids = torch.randint(0, 384, (2, 7))
    engine = Engine(model)
    layer = engine.em.layers[0]
    assert len(layer.qkv.modules) == 1 and isinstance(layer.qkv.modules[0], QuantLinear)
    assert len(layer.gate_up.modules) == 1
    out = engine.generate(ids, max_new_tokens=6, ignore_eos=True)
    assert torch.equal(out, _hf_greedy(model, ids, torch.ones_like(ids), 6))
