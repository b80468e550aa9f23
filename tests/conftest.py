"""Shared fixtures: the real embedded model (loaded once per session) and fresh copies of it."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def real_model_fp32():
    """The embedded default real model in float32 (do not modify: use `fresh_real_model`)."""
    import quantbench

    model, tokenizer = quantbench.load_model(quantbench.DEFAULT_MODEL, dtype="fp32")
    return model, tokenizer


@pytest.fixture
def fresh_real_model(real_model_fp32):
    """A private float32 copy of the real model that a test may quantize in place."""
    model, tokenizer = real_model_fp32
    clone = copy.deepcopy(model)
    clone.quantbench_source = dict(model.quantbench_source)
    return clone, tokenizer


@pytest.fixture
def tiny_model():
    """A 2-layer random model of the real Qwen2.5-0.5B architecture: fast structural tests."""
    import quantbench

    return quantbench.random_model("qwen2.5-0.5b", dtype="fp32", num_hidden_layers=2, vocab_size=512)


@pytest.fixture
def small_random_model():
    """Two layers of the Qwen2.5 architecture at reduced width: a checkpoint round trip in a second."""
    import quantbench

    return quantbench.random_model(
        "qwen2.5-0.5b",
        dtype="fp32",
        num_hidden_layers=2,
        vocab_size=512,
        hidden_size=256,
        intermediate_size=640,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


@pytest.fixture(scope="session")
def tiny_hf_base(tmp_path_factory) -> Path:
    """A 2-layer Qwen2-architecture HF directory with the real tokenizer: a base load_model reads."""
    from transformers import AutoTokenizer

    import quantbench
    from quantbench.models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(quantbench.DEFAULT_MODEL)))
    torch.manual_seed(0)
    model = quantbench.random_model(
        "qwen2.5-0.5b",
        dtype="fp32",
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    out = tmp_path_factory.mktemp("tiny-base")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
