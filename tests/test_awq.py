"""AWQ: folding scales leaves the float model unchanged; the search and clipping never do worse than
no scaling / no clipping on their own objective; whole-model runs on small random models."""

from __future__ import annotations

import copy

import pytest
import torch

import quantbench
from quantbench.quant.awq import (
    AWQLinear,
    ScaleGroup,
    fold_into_linear_rows,
    fold_into_norm,
    pseudo_quantize,
    scale_groups,
    scale_linear_inputs,
    search_clip,
    search_scales,
)
from quantbench.quant.calib import CalibData
from quantbench.quant.rtn import dequantize_rtn, quantize_rtn


def _tiny(arch: str = "qwen2.5-0.5b", dtype=torch.float64, **kw):
    cfg = dict(
        num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4, vocab_size=512
    )
    cfg.update(kw)
    return quantbench.random_model(arch, dtype=dtype, **cfg)


def _randomize_norms(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = (0.5 + torch.rand(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype)


@pytest.mark.parametrize("arch,kv_heads", [("qwen2.5-0.5b", 2), ("mistral-7b", 4)])
def test_folding_random_scales_keeps_float_outputs(arch, kv_heads):
    """Fold arbitrary positive scales into every foldable group: the float64 model's logits stay the
    same to 1e-9 relative (rounding only). With 4 KV heads = 4 heads, v->o is foldable too."""
    model = _tiny(arch, num_key_value_heads=kv_heads, head_dim=32)
    _randomize_norms(model)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    gen = torch.Generator().manual_seed(1)
    labels = []
    for layer in model.model.layers:
        for group in scale_groups(layer):
            labels.append(group.name)
            width = next(iter(group.linears.values())).in_features
            s = torch.exp(torch.randn(width, generator=gen, dtype=torch.float64))
            if isinstance(group.prev, torch.nn.Linear):
                fold_into_linear_rows(group.prev, s)
            else:
                fold_into_norm(group.prev, s)
            for lin in group.linears.values():
                scale_linear_inputs(lin, s)
    expected = {"input_layernorm->qkv", "post_attention_layernorm->gate/up", "up->down"}
    if kv_heads == 4:
        expected.add("v->o")
    assert set(labels) == expected
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_gemma_norm_folding():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm = Gemma3RMSNorm(16).double()
    norm.weight.data = torch.randn(16, dtype=torch.float64) * 0.3
    x = torch.randn(4, 16, dtype=torch.float64)
    s = torch.rand(16, dtype=torch.float64) + 0.5
    ref = norm(x) / s
    fold_into_norm(norm, s)  # Gemma computes x * (1 + w)
    # Gemma3RMSNorm normalizes in float32 internally: agreement to float32 rounding.
    torch.testing.assert_close(norm(x), ref, rtol=1e-6, atol=1e-6)


def test_searched_scales_fold_without_changing_block_output():
    """The real search on a block, then folding: block output unchanged before quantization (float64,
    relative 1e-9), and the chosen ratio is no worse than no scaling on the search objective."""
    model = _tiny(num_key_value_heads=4, head_dim=32)
    _randomize_norms(model)
    layer = model.model.layers[0]
    x = torch.randn(2, 32, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x[..., 7] *= 20  # an outlier channel, as real activations have
    rot = model.model.rotary_emb(x, torch.arange(32).unsqueeze(0))
    kwargs = {"position_embeddings": rot, "attention_mask": None}
    with torch.no_grad():
        ref = layer(x, **kwargs)
        groups = scale_groups(layer)
        group = next(g for g in groups if g.name == "post_attention_layernorm->gate/up")
        feats = []
        h = layer.mlp.gate_proj.register_forward_pre_hook(lambda m, a: feats.append(a[0]))
        layer(x, **kwargs)
        h.remove()
        xs = feats[0].reshape(-1, 128)
        scales, ratio, gain = search_scales(group, xs, [xs], group.inspect, 4, 32, False, True)
        assert gain <= 1.0  # best over the grid includes ratio 0
        fold_into_norm(group.prev, scales)
        for lin in group.linears.values():
            scale_linear_inputs(lin, scales)
        out = layer(x, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    assert isinstance(group, ScaleGroup)


def test_pseudo_quantize_is_rtn():
    w = torch.randn(64, 256) * 0.02
    for sym in (True, False):
        for g in (32, 128, -1):
            assert torch.equal(pseudo_quantize(w, 4, g, sym), dequantize_rtn(*quantize_rtn(w, 4, g, sym), 4))


def test_clip_search_never_worse_than_no_clip():
    torch.manual_seed(0)
    w = torch.randn(32, 128) * 0.05
    w[:, 3] = 0.6  # outlier weights make clipping attractive
    x = torch.randn(256, 128)
    max_val = search_clip(w, x, 4, 32, False)
    clipped = torch.clamp(w.reshape(32, 4, 32), -max_val, max_val).reshape(32, 128)

    def group_err(weight):
        q = pseudo_quantize(weight, 4, 32, False).reshape(32, 4, 32)
        ref = w.reshape(32, 4, 32)
        xg = x.reshape(256, 4, 32)
        return (torch.einsum("tng,ong->otn", xg, q) - torch.einsum("tng,ong->otn", xg, ref)).pow(2).mean(1)

    assert torch.all(group_err(clipped) <= group_err(w) + 1e-7)
    assert bool((max_val < w.reshape(32, 4, 32).abs().amax(-1, keepdim=True)).any())


@pytest.mark.parametrize("spec", ["awq:group=32,clip=1", "awq:group=64,sym,duo=0"])
def test_awq_whole_model(spec):
    model = _tiny(
        dtype=torch.float32, num_key_value_heads=2, hidden_size=64, intermediate_size=128, head_dim=16
    )
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    float_model = copy.deepcopy(model)
    quantbench.quantize(model, spec, calib=CalibData(ids), log=lambda s: None)
    layers = [m for m in model.modules() if isinstance(m, AWQLinear)]
    assert len(layers) == 14
    assert (layers[0].qzeros is None) == ("sym" in spec)
    with torch.no_grad():
        out = model(ids).logits.float()
    assert (out - ref).pow(2).mean() / ref.pow(2).mean() < 0.05
    # some norm took the scales (a group whose best ratio is 0 leaves its norm alone)
    norms = [n for n, _ in model.named_parameters() if "layernorm" in n]
    changed = [
        n
        for n in norms
        if not torch.equal(
            model.get_parameter(n).float(), float_model.get_parameter(n).to(torch.bfloat16).float()
        )
    ]
    ratio = model.quantbench_calibration["mean_ratio"]
    assert changed or not ratio
    assert ratio is None or 0.0 <= ratio < 1.0


def test_calibration_statistics_in_row_chunks_equal_the_float64_ones():
    """Past ROW_CHUNK rows the per-channel mean |x| and per-row max |x| are taken chunk by chunk (a 7B's
    MLP inputs over the calibration set do not fit in float32 at once); they equal float64's."""
    from quantbench.quant import awq

    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    torch.testing.assert_close(
        awq.abs_column_mean(x, chunk=7), x.double().abs().mean(0).float(), rtol=1e-6, atol=0
    )
    assert torch.equal(awq.abs_row_max(x, chunk=7), x.abs().amax(dim=1))
