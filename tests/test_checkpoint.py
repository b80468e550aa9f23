"""Save -> load is bit-exact; broken checkpoints fail with one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import quantbench
from quantbench import CheckpointError


def _roundtrip(model, tokenizer, tmp_path: Path):
    quantbench.save_quantized(model, tokenizer, tmp_path / "ckpt")
    return quantbench.load_quantized(tmp_path / "ckpt")


@pytest.mark.parametrize("spec", ["bf16", "int8", "int4:group=64,asym"])
def test_roundtrip_bit_exact_tiny(tiny_model, tmp_path: Path, spec: str) -> None:
    quantbench.quantize(tiny_model, spec)
    loaded, _ = _roundtrip(tiny_model, None, tmp_path)
    original = tiny_model.state_dict()
    for key, value in loaded.state_dict().items():
        assert value.dtype == original[key].dtype, key
        assert torch.equal(value, original[key]), key
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(tiny_model(ids).logits, loaded(ids).logits)
    assert loaded.quantbench_config == tiny_model.quantbench_config


def test_roundtrip_real_model_same_logits(fresh_real_model, tmp_path: Path) -> None:
    model, tokenizer = fresh_real_model
    quantbench.quantize(model, "int4:group=128")
    loaded, loaded_tok = _roundtrip(model, tokenizer, tmp_path)
    ids = tokenizer("Quantization trades accuracy for memory.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded_tok("abc").input_ids == tokenizer("abc").input_ids
    # load_model recognises a checkpoint directory too
    again, _ = quantbench.load_model(str(tmp_path / "ckpt"))
    assert again.quantbench_config.spec == model.quantbench_config.spec


@pytest.fixture
def saved(tiny_model, tmp_path: Path) -> Path:
    quantbench.quantize(tiny_model, "int4")
    return quantbench.save_quantized(tiny_model, None, tmp_path / "ckpt")


def test_missing_manifest(saved: Path) -> None:
    (saved / "quantbench.json").unlink()
    with pytest.raises(CheckpointError, match="quantbench.json is missing"):
        quantbench.load_quantized(saved)


def test_truncated_weights(saved: Path) -> None:
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        quantbench.load_quantized(saved)


def test_corrupt_weights(saved: Path) -> None:
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        quantbench.load_quantized(saved)


def test_missing_weights(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        quantbench.load_quantized(saved)


def test_unknown_method_in_manifest(saved: Path) -> None:
    manifest = json.loads((saved / "quantbench.json").read_text())
    manifest["quantization"]["method"] = "int3"
    (saved / "quantbench.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="unknown method 'int3'"):
        quantbench.load_quantized(saved)


def test_garbage_manifest(saved: Path) -> None:
    (saved / "quantbench.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        quantbench.load_quantized(saved)
