"""compressed-tensors export / import, proven by the libraries that consume and produce the format.

* export -> import gives back the very same checkpoint (no peer needed);
* transformers' compressed-tensors integration loads each export and the compressed-tensors package's
  own decompressor (``ModelCompressor.decompress_model``) yields our dequantized weights bit for bit;
* llm-compressor 0.14 checkpoints (GPTQ W4A16, SmoothQuant + GPTQ W8A8) import with the weights the
  compressed-tensors decompressor gives.

The peer tests run where compressed-tensors / llmcompressor are installed (the ``peers-ct`` extra) and
are skipped elsewhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import quantbench
from quantbench.checkpoint_export import export_checkpoint, import_checkpoint
from quantbench.errors import CheckpointError
from quantbench.quant.calib import CalibData
from quantbench.quant.export import pack_cols, pack_rows

sys.path.insert(0, str(Path(__file__).parent))
from tinyqwen import tiny_qwen  # noqa: E402

# Layouts compressed-tensors holds exactly. compute=fp32 so that our dequantized weights carry every
# bit of (code - zero) * scale, which the consumer (loading with dtype float32) must reproduce.
SPECS = [
    "int4:group=32,compute=fp32",
    "int4:group=32,asym,compute=fp32",
    "int8:compute=fp32",  # 8-bit per channel: pack-quantized W8A16
    "gptq:group=32,compute=fp32",
    "awq:group=32,compute=fp32",
    "smoothquant:compute=fp32",  # int-quantized W8A8
    "fp8:compute=fp32",  # float-quantized FP8 dynamic
]
# Logit tolerances against transformers + compressed-tensors (fp32, CPU). Weight-only formats match
# exactly. W8A8/FP8 quantize activations at run time and compressed-tensors' fake quantization differs:
# int8 divides the token absmax by 127.5 and clamps to [-128, 127] (quantbench and vLLM's kernel: 127,
# +-127); fp8 rounds x/scale in a different order. Bounds are relative to the largest logit of this
# tiny model (spread 0.5, whose logits reach about 23).
LOGIT_RTOL = {"smoothquant": 0.2, "fp8": 0.05}


def _ids() -> torch.Tensor:
    return torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))


def _quantized(tmp_path: Path, spec: str):
    model = tiny_qwen(0, spread=0.5)
    quantbench.quantize(model, spec, calib=CalibData(_ids()), log=lambda s: None)
    quantbench.save_quantized(model, None, tmp_path / "ck")
    return model


def _quantized_layers(model):
    from quantbench.quant.base import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_ct_pack_words():
    # int4 codes u (signed u - 8) packed along the input dimension, element i in bits 4i.
    codes = torch.arange(16).reshape(2, 8)
    assert pack_cols(codes, 4)[0].item() == 0x76543210
    # zero points pack along the output dimension
    assert pack_rows(torch.arange(8).unsqueeze(1), 4).item() == 0x76543210


def test_ct_pack_matches_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    gen = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        u = torch.randint(0, 2**bits, (16, 64), generator=gen)
        signed = (u - 2 ** (bits - 1)).to(torch.int8)
        assert torch.equal(pack_cols(u, bits), helpers.pack_to_int32(signed, bits))
        assert torch.equal(pack_rows(u, bits), helpers.pack_to_int32(signed, bits, packed_dim=0))


@pytest.mark.parametrize("spec", SPECS)
def test_ct_export_import_roundtrip(tmp_path, spec):
    model = _quantized(tmp_path, spec)
    export_checkpoint(tmp_path / "ck", tmp_path / "ex", "compressed-tensors")
    qc = json.loads((tmp_path / "ex" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    import_checkpoint(tmp_path / "ex", tmp_path / "back")
    back, _ = quantbench.load_quantized(tmp_path / "back")
    assert back.quantbench_config.spec == model.quantbench_config.spec
    sa, sb = model.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_ct_export_errors(tmp_path):
    model = tiny_qwen(0)
    quantbench.quantize(model, "nf4")
    quantbench.save_quantized(model, None, tmp_path / "nf4")
    with pytest.raises(CheckpointError, match="no compressed-tensors layout"):
        export_checkpoint(tmp_path / "nf4", tmp_path / "x", "compressed-tensors")
    model = tiny_qwen(0)
    quantbench.quantize(model, "gptq:group=32,act_order=1", calib=CalibData(_ids()), log=lambda s: None)
    quantbench.save_quantized(model, None, tmp_path / "ao")
    with pytest.raises(CheckpointError, match="g_idx"):
        export_checkpoint(tmp_path / "ao", tmp_path / "y", "compressed-tensors")


@pytest.mark.parametrize("spec", SPECS)
def test_ct_export_loads_in_transformers(tmp_path, spec):
    """transformers' compressed-tensors integration loads the export; compressed-tensors decompresses it
    to our weights bit for bit; logits within LOGIT_RTOL (0 for weight-only formats)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from transformers import AutoModelForCausalLM

    model = _quantized(tmp_path, spec)
    export_checkpoint(tmp_path / "ck", tmp_path / "ex", "compressed-tensors")
    ct = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ex"), dtype=torch.float32)
    for name in _quantized_layers(model):  # loaded compressed, as vLLM would receive it
        assert "weight_scale" in dict(ct.get_submodule(name).named_parameters()), name
    ModelCompressor.from_compression_config(ct.config.quantization_config).decompress_model(ct)
    for name, module in _quantized_layers(model).items():
        theirs = ct.get_submodule(name).weight
        assert theirs.dtype == torch.float32 and torch.equal(theirs, module.dequantize()), name
    with torch.no_grad():
        ours, theirs = model(_ids()).logits, ct(_ids()).logits
    rtol = LOGIT_RTOL.get(model.quantbench_config.method, 0.0)
    assert (ours - theirs).abs().max().item() <= rtol * ours.abs().max().item()


# --------------------------------------------------------------------------------------------------
# Checkpoints that llm-compressor writes


def _llmcompressor_checkpoint(src: Path, out: Path, which: str, dtype: torch.dtype, samples: int = 8) -> Path:
    """Run llm-compressor's oneshot on the HF model ``src``: ``w4a16`` (GPTQ, int4 group 32, symmetric)
    or ``w8a8`` (SmoothQuant then GPTQ int8 per channel, dynamic int8 tokens)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    if which == "w4a16":
        recipe = [
            GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
        ]
    else:
        recipe = [
            SmoothQuantModifier(smoothing_strength=0.5),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
        ]
    ids = torch.randint(0, 1000, (samples, 32), generator=torch.Generator().manual_seed(1))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype)
    oneshot(
        model=model,
        dataset=data,
        recipe=recipe,
        num_calibration_samples=samples,
        max_seq_length=32,
        output_dir=str(out),
    )
    return out


def _check_llmcompressor_import(tmp_path: Path, src: Path, which: str, method: str) -> None:
    from compressed_tensors.compressors import ModelCompressor
    from transformers import AutoModelForCausalLM

    lc = _llmcompressor_checkpoint(src, tmp_path / which, which, torch.bfloat16)
    import_checkpoint(lc, tmp_path / "qb")
    ours, _ = quantbench.load_quantized(tmp_path / "qb")
    manifest = json.loads((tmp_path / "qb" / "quantbench.json").read_text())
    assert ours.quantbench_config.method == method and manifest["source"]["scales_rounded"] == 0
    ct = AutoModelForCausalLM.from_pretrained(str(lc), dtype=torch.bfloat16)
    ModelCompressor.from_compression_config(ct.config.quantization_config).decompress_model(ct)
    layers = _quantized_layers(ours)
    assert layers
    for name, module in layers.items():  # bf16 model, bf16 scales: (q - zp) * scale rounds once in both
        assert torch.equal(ct.get_submodule(name).weight, module.dequantize()), name
    with torch.no_grad():
        a, b = ours(_ids()).logits.float(), ct(_ids()).logits.float()
    # W4A16: the same bf16 weights through the same bf16 modules; W8A8: activation quantization differs
    # (see LOGIT_RTOL) on top of bf16 rounding.
    rtol = {"gptq": 0.02, "smoothquant": 0.2}[method]
    assert (a - b).abs().max().item() <= rtol * a.abs().max().item()


@pytest.mark.parametrize("which,method", [("w4a16", "gptq"), ("w8a8", "smoothquant")])
def test_import_llmcompressor_tiny(tmp_path, which, method):
    pytest.importorskip("llmcompressor")
    src = tmp_path / "tiny"
    tiny_qwen(0, spread=0.5).to(torch.bfloat16).save_pretrained(src)
    _check_llmcompressor_import(tmp_path, src, which, method)


@pytest.mark.slow
@pytest.mark.parametrize("which,method", [("w4a16", "gptq"), ("w8a8", "smoothquant")])
def test_import_llmcompressor_default_model(tmp_path, which, method):
    pytest.importorskip("llmcompressor")
    from quantbench.models import resolve_model_dir

    _check_llmcompressor_import(tmp_path, resolve_model_dir(quantbench.DEFAULT_MODEL), which, method)


def test_cli_export_compressed_tensors(tmp_path, capsys):
    from quantbench.cli import main as cli_main

    model = tiny_qwen(0)
    quantbench.quantize(model, "int4:group=32,asym")
    quantbench.save_quantized(model, None, tmp_path / "ck")
    cli_main(
        ["export", str(tmp_path / "ck"), "--format", "compressed-tensors", "--out", str(tmp_path / "ex")]
    )
    # --overwrite replaces our own export, nothing else
    cli_main(
        [
            "export",
            str(tmp_path / "ck"),
            "-f",
            "compressed-tensors",
            "-o",
            str(tmp_path / "ex"),
            "--overwrite",
        ]
    )
    cli_main(["import", str(tmp_path / "ex"), "--out", str(tmp_path / "back")])
    out = capsys.readouterr().out
    assert "exported" in out and "imported" in out and "int4:" in out


@pytest.mark.parametrize(
    ("recipe", "alpha"),
    [
        ("SmoothQuantModifier:\n  smoothing_strength: 0.8\nGPTQModifier:\n  scheme: W8A8\n", 0.8),
        ("SmoothQuantModifier:\n  ignore: []\nGPTQModifier:\n  scheme: W8A8\n", 0.5),  # its default
        ("GPTQModifier:\n  scheme: W8A8\n", 0.0),  # no smoothing
    ],
)
def test_imported_w8a8_records_the_recipes_smoothing_strength(recipe, alpha):
    """An imported W8A8 checkpoint's spec says how llm-compressor smoothed it (the weights arrive smoothed;
    the spec is the record)."""
    from quantbench.quant import parse_spec
    from quantbench.quant.ct_format import _spec_for

    group = {
        "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
        "input_activations": {
            "num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True,
        },
    }  # fmt: skip
    config = parse_spec(_spec_for("int-quantized", group, "bf16", recipe))
    assert config.method == "smoothquant" and config["alpha"] == alpha
