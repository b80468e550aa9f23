"""Checks every quantization method's tests share: a one-layer copy of the real model, and the checkpoint
round trip (``save_quantized`` / ``load_quantized``) bit for bit."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

import quantbench

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def first_real_layers(model: nn.Module, n: int = 1) -> nn.Module:
    """A copy of the real model keeping its first ``n`` decoder layers (real weights, fast to quantize)."""
    layers = model.model.layers
    model.model.layers = nn.ModuleList(list(layers[:n]))
    try:
        small = copy.deepcopy(model)
    finally:
        model.model.layers = layers
    small.config.num_hidden_layers = n
    if getattr(small.config, "layer_types", None):
        small.config.layer_types = small.config.layer_types[:n]
    return small


def assert_checkpoint_roundtrip(model: nn.Module, directory: Path, linear_cls: type, vocab: int = 512) -> None:
    """Save the quantized ``model`` and load it back: ``linear_cls`` modules, every tensor of the same dtype
    and bits (fp8 by bit pattern, which tells -0 from +0), the same config and the same logits."""
    quantbench.save_quantized(model, None, directory)
    loaded, _ = quantbench.load_quantized(directory)
    assert any(isinstance(m, linear_cls) for m in loaded.modules())
    original = model.state_dict()
    state = loaded.state_dict()
    assert state.keys() == original.keys()
    for key, value in state.items():
        ref = original[key]
        assert value.dtype == ref.dtype, key
        if value.dtype in FP8_DTYPES:
            value, ref = value.view(torch.uint8), ref.view(torch.uint8)
        assert torch.equal(value, ref), key
    assert loaded.quantbench_config == model.quantbench_config
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
