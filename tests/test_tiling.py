"""Tile-major weight storage (the CUDA GEMV's layout): the module computes the same function, saves
row-major checkpoints, refuses loads into tiled storage, and the engine tiles fused layers once."""

from __future__ import annotations

import copy

import pytest
import torch

import quantbench
from quantbench import parse_spec
from quantbench.engine.kernels.layouts import layout_for, tiling_for
from quantbench.quant import METHODS

SPECS = [
    "int4:group=128",
    "int4:group=32,asym",
    "int8",
    "int8:group=64",
    "nf4:block=64,dq=1",
    "fp4:block=128",
    "fp8",
    "llm.int8",
    "smoothquant",
]


def _module(spec: str, n: int = 256, k: int = 512):
    torch.manual_seed(len(spec))
    lin = torch.nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    return METHODS[parse_spec(spec).method].linear_cls.from_linear(lin, parse_spec(spec))


@pytest.mark.parametrize("spec", SPECS)
def test_tiled_module_is_the_same_function(spec: str) -> None:
    module = _module(spec)
    tiles = tiling_for(module)
    assert tiles is not None and tiles["qweight"][0] == 16  # one tensor-core GEMV warp step: 16 rows
    twin = copy.deepcopy(module)
    twin.store_tiled(tiles)
    assert not torch.equal(twin.qweight, module.qweight)  # really permuted in place
    assert layout_for(twin).tile_n == tiles["qweight"][0] and layout_for(module).tile_n == 0
    assert tiling_for(twin) is None  # never tiled twice
    x = torch.randn(3, 512)
    assert torch.equal(twin(x), module(x))
    assert torch.equal(twin.dequantize(), module.dequantize())
    ours, theirs = twin.state_dict(), module.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)  # checkpoints stay row-major
    with pytest.raises(RuntimeError, match="tile-major"):
        twin.load_state_dict(theirs)
    with pytest.raises(RuntimeError, match="already"):
        twin.store_tiled(tiles)


def test_tile_choice_per_format_and_shapes_that_do_not_divide() -> None:
    """Tiles of one tensor-core GEMV step (16 rows x 4 lanes x V words) by default; the half2 GEMV's own
    tiles when batch 1 keeps that kernel (symmetric int4 then stays row-major); none when rows do not
    divide."""
    from quantbench.engine import EngineOptions

    assert tiling_for(_module("int4:group=128"))["qweight"] == (16, 64)  # 16 words (64 bytes) per row
    assert tiling_for(_module("nf4:block=64"))["qweight"] == (16, 32)  # 64-weight blocks: 8 words per step
    assert tiling_for(_module("int8"))["qweight"] == (16, 64)
    assert tiling_for(_module("nf4:block=64", n=200)) is None  # 200 rows: no 16-row tiles
    half2 = EngineOptions(mma_batch1=False)
    assert tiling_for(_module("int4:group=128"), half2) is None
    assert tiling_for(_module("nf4:block=64"), half2)["qweight"] == (128, 32)
    assert tiling_for(_module("nf4:block=64"), EngineOptions(mma=False))["qweight"] == (128, 32)


def test_engine_tiles_fused_layers_once() -> None:
    """The engine stores fused q/k/v and gate/up tile-major; the HF modules (views of the fused
    storage) still compute the same logits, and a second engine on the same model re-fuses the tiled
    parts without permuting them again."""
    from quantbench.engine import EngineModel

    torch.manual_seed(0)
    model = quantbench.random_model(
        "mistral-7b", dtype="fp32", num_hidden_layers=2, vocab_size=256, hidden_size=256,
        intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    )  # fmt: skip
    quantbench.quantize(model, "int8")
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    start = torch.zeros(2, dtype=torch.int32)
    outs = []
    for tile in (False, True, True):
        engine = EngineModel(model, use_kernels=False, tile=tile)
        engine.allocate_cache(2, 16)
        outs.append(engine.prefill(ids, start, False))
    layer = model.model.layers[0]
    assert layer.self_attn.k_proj.tiling and layer.mlp.up_proj.tiling
    assert layer.mlp.down_proj.tiling
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("spec", ["int4:group=128", "nf4:block=64"])
def test_checkpoint_after_engine_is_unchanged(spec: str, tmp_path) -> None:
    """Saving after an engine fused and tiled the layers (views of the fused, tile-major storage) writes
    the same tensors as saving before it."""
    from safetensors.torch import load_file

    from quantbench.engine import EngineModel

    def model():
        torch.manual_seed(0)
        m = quantbench.random_model(
            "mistral-7b", dtype="fp32", num_hidden_layers=2, vocab_size=256, hidden_size=256,
            intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        )  # fmt: skip
        quantbench.quantize(m, spec)
        return m

    quantbench.save_quantized(model(), None, tmp_path / "before")
    used = model()
    EngineModel(used, use_kernels=False, tile=True)
    quantbench.save_quantized(used, None, tmp_path / "after")
    before = load_file(tmp_path / "before" / "model.safetensors")
    after = load_file(tmp_path / "after" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    reloaded, _ = quantbench.load_quantized(tmp_path / "after")
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model()(ids).logits)
