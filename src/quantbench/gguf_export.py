"""``quantbench export --format gguf``: a ``.gguf`` file that llama.cpp loads and transformers reads back.

What is written:

* the key-value metadata of the GGUF the model came from (tokenizer, hyper-parameters; kept beside the
  converted model as :data:`quantbench.models.GGUF_METADATA_NAME`), with ``general.file_type`` set for the
  new weights: the architecture and vocabulary stay exactly what llama.cpp wrote;
* every weight under llama.cpp's tensor name, in the layout llama.cpp's ``convert_hf_to_gguf.py`` uses
  (Llama's q/k rows permuted for its rope, Gemma's RMSNorm weights stored as ``1 + w``);
* llama.cpp-format layers (``q8_0`` ... ``q6_k``, the ``q4_k_m`` mix) as their block bytes, unchanged; other
  matrices as F16 / BF16 / F32 in the model's dtype; 1-D tensors (norms, biases) as F32, as llama.cpp does.

Layers of other methods (NF4, GPTQ, ...) have no llama.cpp type: exporting them is refused with one line.
A model that did not come from a GGUF file has no vocabulary metadata to copy: also refused (llama.cpp's
``convert_hf_to_gguf.py`` converts a Hugging Face directory).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from quantbench.errors import CheckpointError
from quantbench.models import GGUF_METADATA_NAME, copy_gguf_metadata
from quantbench.quant.apply import BASELINE_DTYPES
from quantbench.quant.base import QuantLinear

# Architectures whose tensor layout this writer knows (the inverse of transformers' GGUF processors).
SUPPORTED_ARCHS = ("qwen2", "qwen3", "llama", "gemma2", "gemma3")
_GEMMA_NORM_ARCHS = ("gemma2", "gemma3")


class GGUFExportError(CheckpointError):
    """The model cannot be written as a GGUF file that llama.cpp would read correctly."""


def source_metadata_path(model: nn.Module) -> Path:
    """The kept metadata of the GGUF file ``model`` was converted from, or a one-line error."""
    source = getattr(model, "quantbench_source", None) or {}
    model_dir = source.get("path")
    path = Path(model_dir) / GGUF_METADATA_NAME if model_dir else None
    if path is None or not path.is_file():
        # The packaged models and .gguf files keep it; reloading the source once adds it to older caches.
        hint = source.get("spec") or model_dir or "?"
        raise GGUFExportError(
            f"GGUF export needs a model converted from a GGUF file (its vocabulary is copied from it); "
            f"{hint} has no {GGUF_METADATA_NAME}: load it once with this quantbench version, or convert a "
            "Hugging Face directory with llama.cpp's convert_hf_to_gguf.py"
        )
    return path


def permute_rope_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Llama q/k rows from Hugging Face's rotate-half order to llama.cpp's interleaved order.

    The inverse of transformers' ``LlamaTensorProcessor._reverse_permute_weights``; it moves whole rows, so
    it applies to float matrices and to rows of quantized blocks alike.
    """
    head_dim_half = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, 2, head_dim_half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _name_map(model: nn.Module, arch: str) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face state-dict name, from transformers' own GGUF mapping."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    mapping = get_gguf_hf_weights_map(skeleton, TensorProcessor(), model_type=arch)
    if getattr(model.config, "tie_word_embeddings", False) or getattr(
        getattr(model.config, "text_config", None), "tie_word_embeddings", False
    ):
        mapping.pop("output.weight", None)  # llama.cpp reads token_embd as the output when it is absent
    return mapping


def _float_tensor(value: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, Any]:
    if value.ndim < 2 or dtype == torch.float32:
        return value.detach().float().cpu().numpy(), gguf.GGMLQuantizationType.F32
    if dtype == torch.bfloat16:
        raw = value.detach().to(torch.bfloat16).cpu().view(torch.uint8).numpy()
        return raw, gguf.GGMLQuantizationType.BF16
    return value.detach().to(torch.float16).cpu().numpy(), gguf.GGMLQuantizationType.F16


def _module_tensor(module: nn.Module, leaf: str, model_dtype: torch.dtype) -> tuple[np.ndarray, Any]:
    """The data and ggml type of one weight: block bytes of a llama.cpp layer, else a float tensor."""
    if isinstance(module, QuantLinear):
        ggml_type = getattr(module, "ggml_type", None)
        if leaf == "bias":
            return module.bias.detach().float().cpu().numpy(), gguf.GGMLQuantizationType.F32
        if ggml_type is None:
            raise GGUFExportError(
                f"{module.config.method} layers have no llama.cpp type: GGUF export takes q8_0, q4_0, q4_1, "
                "q5_0, q5_1, q4_k, q5_k, q6_k, q4_k_m, q5_k_m or an unquantized (bf16/fp16/fp32) model"
            )
        return module.row_major("blocks").cpu().numpy(), ggml_type
    return _float_tensor(getattr(module, leaf), model_dtype)


def file_type(model: nn.Module) -> int:
    """llama.cpp's ``general.file_type`` for the model's method (what ``llama-quantize`` would write)."""
    config = getattr(model, "quantbench_config", None)
    dtype_names = {dtype: name for name, dtype in BASELINE_DTYPES.items()}
    method = config.method if config is not None else dtype_names.get(next(model.parameters()).dtype, "fp32")
    by_method = {
        "fp32": gguf.LlamaFileType.ALL_F32,
        "fp16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
        "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
        "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S,
        "q5_k": gguf.LlamaFileType.MOSTLY_Q5_K_S,
        "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
        "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
        "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    }
    if method not in by_method:
        raise GGUFExportError(
            f"{method} has no llama.cpp type: GGUF export takes {', '.join(by_method)} models"
        )
    return int(by_method[method])


def _quantized_embedding(model: nn.Module, data: np.ndarray, ggml_type: Any) -> tuple[np.ndarray, Any]:
    """llama-quantize quantizes the token embedding too: a mix gives it its base type (with the fallback),
    a single-type file type its type. The evaluated model looks the embedding up in 16 bits; the file holds
    llama.cpp's bytes for it, so that it is the file llama-quantize would write."""
    from quantbench.quant.ggml import FORMATS, METHOD_TYPES
    from quantbench.quant.ggml_mix import MIX_BASE_TYPE, mix_layer_type

    config = getattr(model, "quantbench_config", None)
    embedding = model.get_input_embeddings().weight.detach()
    if config is None:
        return data, ggml_type
    if config.method in MIX_BASE_TYPE:
        target = mix_layer_type(config.method, "model.embed_tokens", embedding.shape[1], model.config)
    elif config.method in METHOD_TYPES:
        target = METHOD_TYPES[config.method]
    else:
        return data, ggml_type
    if target not in FORMATS or FORMATS[target].unsupported(embedding.shape[1]):
        return data, ggml_type
    return FORMATS[target].quantize(embedding.float().cpu()).numpy(), target


def gguf_tensors(model: nn.Module, arch: str) -> list[tuple[str, np.ndarray, Any]]:
    """(GGUF name, data, ggml type) of every tensor llama.cpp expects, in llama.cpp's layout."""
    if arch not in SUPPORTED_ARCHS:
        raise GGUFExportError(
            f"GGUF export knows the tensor layout of {', '.join(SUPPORTED_ARCHS)}; this model is {arch}"
        )
    text_config = getattr(model.config, "text_config", model.config)
    n_head = text_config.num_attention_heads
    n_kv = getattr(text_config, "num_key_value_heads", None) or n_head
    dtype = next(model.parameters()).dtype
    tensors = []
    mapping = _name_map(model, arch)
    output = model.get_output_embeddings()
    for gguf_name, hf_name in mapping.items():
        module_name, _, leaf = hf_name.rpartition(".")
        module = model.get_submodule(module_name)
        if (
            gguf_name == "token_embd.weight"
            and "output.weight" not in mapping
            and isinstance(output, QuantLinear)
        ):
            # Tied embeddings: llama.cpp keeps one matrix for both, quantized as the output (the mix's type).
            module, leaf = output, "weight"
        data, ggml_type = _module_tensor(module, leaf, dtype)
        if gguf_name == "token_embd.weight" and not isinstance(module, QuantLinear):
            data, ggml_type = _quantized_embedding(model, data, ggml_type)
        if arch == "llama" and leaf == "weight" and ".attn_q." in gguf_name:
            data = permute_rope_rows(data, n_head)
        elif arch == "llama" and leaf == "weight" and ".attn_k." in gguf_name:
            data = permute_rope_rows(data, n_kv)
        elif arch in _GEMMA_NORM_ARCHS and gguf_name.endswith("norm.weight"):
            data = data + np.float32(1)  # Gemma's RMSNorm scales by 1 + w; GGUF stores the sum
        tensors.append((gguf_name, np.ascontiguousarray(data), ggml_type))
    return tensors


def export_gguf(model: nn.Module, out: str | Path) -> Path:
    """Write ``model`` (a baseline or a llama.cpp-format quantization) as one ``.gguf`` file at ``out``.

    The file is written beside ``out`` and renamed into place when complete.
    """
    meta_path = source_metadata_path(model)
    reader = gguf.GGUFReader(str(meta_path))
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    ftype = file_type(model)
    tensors = gguf_tensors(model, arch)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), arch=arch)
        replaced = frozenset({gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION})
        copy_gguf_metadata(reader, writer, skip=replaced)
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, data, ggml_type in tensors:
            if ggml_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                writer.add_tensor(name, data)
            else:
                writer.add_tensor(name, data, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
