"""A tiny random-weight model of the real Qwen2.5 architecture with the real model's tokenizer (shared by the
serve / sweep / report tests)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def real_tokenizer():
    """The default packaged model's tokenizer (from the converted model in the quantbench cache)."""
    from transformers import AutoTokenizer

    import quantbench
    from quantbench.models import resolve_model_dir

    # A machine without the packaged model (the lent GPU) points this at a copy of its tokenizer files.
    source = os.environ.get("QUANTBENCH_TEST_TOKENIZER") or resolve_model_dir(quantbench.DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_qwen(seed: int = 0, spread: float | None = None):
    """Real Qwen2.5 vocabulary (so the real tokenizer fits), 2 layers, hidden size 64.

    ``spread``: re-draw every matrix with this standard deviation (larger than the HF init's 0.02, so the
    random model does not just repeat its last token)."""
    return tiny_model("qwen2.5-0.5b", seed, spread)


def tiny_model(config_name: str, seed: int = 0, spread: float | None = None, **overrides):
    """A 2-layer, hidden-size-64 random model of a real architecture (``overrides`` change config fields),
    optionally re-drawn with a larger ``spread`` (see :func:`tiny_qwen`)."""
    import quantbench

    model = quantbench.random_model(
        config_name,
        dtype="fp32",
        seed=seed,
        **{
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 512,
            **overrides,
        },
    )
    if spread is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, spread, generator=torch.Generator().manual_seed(seed + p.numel()))
    return model


def save_tiny_qwen(out: Path, seed: int = 0, spread: float | None = 0.5) -> Path:
    """Write the tiny model and the real tokenizer as a Hugging Face directory (loadable by load_model)."""
    model = tiny_qwen(seed, spread)
    model.save_pretrained(out)
    real_tokenizer().save_pretrained(out)
    return out
