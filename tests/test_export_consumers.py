"""GPTQ and AWQ exports loaded by a real consumer: transformers' GPTQ / AWQ integration, which routes
both through GPTQModel (with optimum for GPTQ). Runs where the ``peers-gptq`` extra is installed
(gptqmodel installs CPU-only on torch 2.13); skipped elsewhere.

Weights: GPTQModel's own dequantization of our files equals our dequantized weights bit for bit, in
fp16 (GPTQ checkpoints are fp16 models; in fp16 ``(q - zero) * scale`` rounds once in both).
Logits: GPTQModel's CPU kernels in fp16 against quantbench's fp16 path (fp32 accumulation), on a tiny
random model of large weight spread (logits up to about 23): they agree to LOGIT_RTOL of the largest
logit. AWQ on CPU is looser: GPTQModel's CPU AWQ kernel (TorchAtenAwqLinear) converts the fp16 scales
to bf16 before its int4 matmul."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import quantbench
from quantbench.checkpoint_export import export_checkpoint
from quantbench.quant.calib import CalibData
from quantbench.quant.rtn import RTNLinear

sys.path.insert(0, str(Path(__file__).parent))
from tinyqwen import tiny_qwen  # noqa: E402

pytest.importorskip("gptqmodel", reason="gptqmodel not installed (pip install -e .[peers-gptq])")
pytest.importorskip("optimum", reason="optimum not installed (pip install -e .[peers-gptq])")

LOGIT_RTOL = {"gptq": 0.06, "awq": 0.06}


def _ids() -> torch.Tensor:
    return torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))


def _export(tmp_path: Path, spec: str, fmt: str):
    model = tiny_qwen(0, spread=0.5)
    quantbench.quantize(model, spec, calib=CalibData(_ids()), log=lambda s: None)
    quantbench.save_quantized(model, None, tmp_path / "ck")
    export_checkpoint(tmp_path / "ck", tmp_path / "ex", fmt)
    return model


def _layers(model) -> dict[str, RTNLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, RTNLinear)}


def _logits_close(ours, theirs, fmt: str) -> None:
    with torch.no_grad():
        a, b = ours(_ids()).logits.float(), theirs(_ids()).logits.float()
    assert (a - b).abs().max().item() <= LOGIT_RTOL[fmt] * a.abs().max().item()


@pytest.mark.parametrize(
    "spec", ["gptq:group=32,compute=fp16", "int4:group=32,asym,compute=fp16", "int8:group=32,compute=fp16"]
)
def test_gptq_export_loads_in_gptqmodel(tmp_path, spec):
    from transformers import AutoModelForCausalLM

    model = _export(tmp_path, spec, "gptq")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ex"), dtype=torch.float16, device_map="cpu")
    for name, module in _layers(model).items():
        theirs = loaded.get_submodule(name)
        assert type(theirs).__module__.startswith("gptqmodel"), type(theirs)
        w = theirs.dequantize_weight().t()  # GPTQModel returns [in, out]
        assert w.dtype == torch.float16 and torch.equal(w, module.dequantize()), name
    _logits_close(model, loaded, "gptq")


@pytest.mark.parametrize("spec", ["awq:group=32,compute=fp16", "int4:group=32,asym,compute=fp16"])
def test_awq_export_loads_in_gptqmodel(tmp_path, spec):
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = _export(tmp_path, spec, "awq")
    tensors = load_file(str(tmp_path / "ex" / "model.safetensors"))
    for name, module in _layers(model).items():  # AutoAWQ's GEMM dequantizer, as GPTQModel ships it
        w = dequantize_gemm(
            tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"], 4, 32
        ).t()
        assert w.dtype == torch.float16 and torch.equal(w, module.dequantize()), name
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ex"), dtype=torch.float16, device_map="cpu")
    for name in _layers(model):
        assert type(loaded.get_submodule(name)).__module__.startswith("gptqmodel"), name
    _logits_close(model, loaded, "awq")
