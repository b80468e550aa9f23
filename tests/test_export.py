"""GPTQ / AWQ export and import: packing against hand-computed words and independent reference
dequantizers (written from the formats' published unpacking code), and export -> import giving
bit-identical weights."""

from __future__ import annotations

import json

import pytest
import torch

import quantbench
from quantbench.checkpoint_export import export_checkpoint, import_checkpoint
from quantbench.cli import main as cli_main
from quantbench.errors import CheckpointError
from quantbench.quant.calib import CalibData
from quantbench.quant.export import (
    pack_awq,
    pack_cols,
    pack_rows,
    unpack_awq,
    unpack_cols,
    unpack_rows,
)


def _tiny():
    return quantbench.random_model(
        "qwen2.5-0.5b",
        dtype="fp32",
        num_hidden_layers=1,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=256,
    )


def test_awq_word_order():
    # Columns 0..7 holding their own index: nibble i carries column [0,2,4,6,1,3,5,7][i].
    word = pack_awq(torch.arange(8).unsqueeze(0))
    assert word.item() == 0x75316420
    assert torch.equal(unpack_awq(word), torch.arange(8).unsqueeze(0))


def test_gptq_word_order():
    # Input rows 0..7 holding their index: row j in bits 4j.
    word = pack_rows(torch.arange(8).unsqueeze(1), 4)
    assert word.item() == 0x76543210
    assert pack_rows(torch.tensor([[15]] * 8), 4).item() == -1  # all ones, stored as int32


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip(bits):
    gen = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2**bits, (64, 48), generator=gen)
    assert torch.equal(unpack_rows(pack_rows(v, bits), bits), v)
    assert torch.equal(unpack_cols(pack_cols(v, bits), bits), v)
    assert pack_rows(v, bits).dtype == torch.int32
    v4 = torch.randint(0, 16, (10, 64), generator=gen)
    assert torch.equal(unpack_awq(pack_awq(v4)), v4)


def _ref_gptq_dequant(t: dict[str, torch.Tensor], bits: int = 4) -> torch.Tensor:
    """AutoGPTQ's torch reference: shift-and-mask unpack, zeros + 1, w = scale * (q - zero)."""
    wf = torch.arange(0, 32, bits, dtype=torch.int32).unsqueeze(0)
    qz = t["qzeros"]
    zeros = torch.bitwise_right_shift(qz.unsqueeze(2).expand(-1, -1, 32 // bits), wf.unsqueeze(0))
    zeros = (torch.bitwise_and(zeros, 2**bits - 1) + 1).reshape(qz.shape[0], -1)
    qw = t["qweight"]
    weight = torch.bitwise_right_shift(qw.unsqueeze(1).expand(-1, 32 // bits, -1), wf.unsqueeze(-1))
    weight = torch.bitwise_and(weight, 2**bits - 1).reshape(-1, qw.shape[1])
    g = t["g_idx"].long()
    return (t["scales"][g].float() * (weight.float() - zeros[g].float())).t()


def _ref_awq_dequant(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """AutoAWQ's unpack_awq + reverse_awq_order, then (q - zero) * scale, groups contiguous."""
    shifts = torch.arange(0, 32, 4)
    iw = torch.bitwise_right_shift(t["qweight"][:, :, None], shifts[None, None, :]).reshape(
        t["qweight"].shape[0], -1
    )
    iz = torch.bitwise_right_shift(t["qzeros"][:, :, None], shifts[None, None, :]).reshape(
        t["qzeros"].shape[0], -1
    )
    reverse = torch.arange(iw.shape[-1]).reshape(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
    iw, iz = iw[:, reverse] & 15, iz[:, reverse] & 15
    group = iw.shape[0] // t["scales"].shape[0]
    zeros = iz.repeat_interleave(group, dim=0)
    scales = t["scales"].repeat_interleave(group, dim=0)
    return ((iw - zeros).float() * scales.float()).t()


CASES = [
    ("int4:group=32,asym", "awq"),
    ("gptq:group=32,act_order=1", "gptq"),
    ("gptq:group=32,asym,act_order=1,static_groups=1", "awq"),
    ("awq:group=32", "gptq"),
    ("int8", "gptq"),
]


@pytest.mark.parametrize("spec,fmt", CASES)
def test_export_import_bit_identical(tmp_path, spec, fmt):
    from safetensors.torch import load_file

    model = _tiny()
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    quantbench.quantize(model, spec, calib=CalibData(ids), log=lambda s: None)
    quantbench.save_quantized(model, None, tmp_path / "ck")
    export_checkpoint(tmp_path / "ck", tmp_path / "ex", fmt)
    hf = json.loads((tmp_path / "ex" / "config.json").read_text())
    qc = hf["quantization_config"]
    assert qc["quant_method"] == fmt and qc == json.loads(
        (tmp_path / "ex" / "quantize_config.json").read_text()
    )
    # the exported tensors dequantize (by the formats' own reference code) to our weights
    tensors = load_file(str(tmp_path / "ex" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    t = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(name + ".")}
    module = model.get_submodule(name)
    ours = module.dequantize()
    ref = _ref_gptq_dequant(t, qc["bits"]) if fmt == "gptq" else _ref_awq_dequant(t)
    torch.testing.assert_close(ref.to(module.compute_dtype), ours, rtol=0, atol=0)
    # and import gives back the very same checkpoint tensors
    import_checkpoint(tmp_path / "ex", tmp_path / "back")
    a, _ = quantbench.load_quantized(tmp_path / "ck")
    b, _ = quantbench.load_quantized(tmp_path / "back")
    assert b.quantbench_config.spec == a.quantbench_config.spec
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_foreign_gptq_import_infers_spec(tmp_path):
    """A GPTQ directory without our spec (as other tools write it) imports with an inferred spec."""
    model = _tiny()
    quantbench.quantize(model, "int4:group=64")
    quantbench.save_quantized(model, None, tmp_path / "ck")
    export_checkpoint(tmp_path / "ck", tmp_path / "ex", "gptq")
    for name in ("config.json", "quantize_config.json"):
        data = json.loads((tmp_path / "ex" / name).read_text())
        qc = data.get("quantization_config", data)
        qc.pop("quantbench")
        (tmp_path / "ex" / name).write_text(json.dumps(data))
    import_checkpoint(tmp_path / "ex", tmp_path / "back")
    b, _ = quantbench.load_quantized(tmp_path / "back")
    assert b.quantbench_config.spec.startswith("gptq:") and "group=64" in b.quantbench_config.spec
    assert "sym=1" in b.quantbench_config.spec
    for key, value in model.state_dict().items():
        if key.endswith(("qweight", "scales")):
            assert torch.equal(value, b.state_dict()[key]), key


def test_export_errors(tmp_path):
    model = _tiny()
    quantbench.quantize(
        model, "smoothquant", calib=CalibData(torch.randint(0, 256, (2, 32))), log=lambda s: None
    )
    quantbench.save_quantized(model, None, tmp_path / "sq")
    with pytest.raises(CheckpointError, match="RTN's int layout"):
        export_checkpoint(tmp_path / "sq", tmp_path / "x", "gptq")
    model = _tiny()
    quantbench.quantize(model, "int8")  # per channel
    quantbench.save_quantized(model, None, tmp_path / "i8")
    with pytest.raises(CheckpointError, match="group size"):
        export_checkpoint(tmp_path / "i8", tmp_path / "y", "awq")
    model = _tiny()
    quantbench.quantize(model, "int8:group=32")
    quantbench.save_quantized(model, None, tmp_path / "i8g")
    with pytest.raises(CheckpointError, match="4-bit"):
        export_checkpoint(tmp_path / "i8g", tmp_path / "y", "awq")
    with pytest.raises(CheckpointError, match="unknown export format"):
        export_checkpoint(tmp_path / "i8", tmp_path / "z", "exl2")


def test_cli_export_import(tmp_path, capsys):
    model = _tiny()
    quantbench.quantize(model, "int4:group=32")
    quantbench.save_quantized(model, None, tmp_path / "ck")
    cli_main(["export", str(tmp_path / "ck"), "--format", "awq", "--out", str(tmp_path / "ex")])
    cli_main(["import", str(tmp_path / "ex"), "--out", str(tmp_path / "back")])
    out = capsys.readouterr().out
    assert "exported" in out and "imported" in out
    with pytest.raises(SystemExit) as exc:
        cli_main(["import", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
