"""llama-quantize's per-tensor type choice for the k-quant mixes, for dense models.

Follows ``llama_tensor_get_type`` in llama.cpp's src/llama-quant.cpp for Q4_K_M, Q5_K_M, Q4_K_S and
Q5_K_S on llama / qwen2 / gemma3 style models (no MoE, no Falcon): the output matrix (or the token
embedding when the model ties it to the output) gets Q6_K, ``attn_v`` and ``ffn_down`` get Q6_K in
the layers ``use_more_bits`` picks, everything else the mix's base type; a row length that is not a
multiple of 256 then falls back to a 32-block type (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0).

The layer rules count tensors in the order llama-quantize visits them, not by layer number. Current
llama.cpp sorts tensors by layer, so the count is the layer number (``order="layer"``); older
versions visited them in the input file's order, which for HF-converted files was lexicographic
(blk.0, blk.1, blk.10, ...), and ``order="file"`` reproduces GGUFs made that way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from quantbench.quant.base import Method
from quantbench.quant.config import Option, QuantConfig, compute_option
from quantbench.quant.ggml import GGMLLinear

T = GGMLQuantizationType

MIX_BASE_TYPE: dict[str, GGMLQuantizationType] = {
    "q4_k_m": T.Q4_K,
    "q4_k_s": T.Q4_K,
    "q5_k_m": T.Q5_K,
    "q5_k_s": T.Q5_K,
}

# tensor_type_fallback: the 32-block type used when a row is not a multiple of 256
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}

_LAYER = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp's use_more_bits: the first and last eighth, and every third layer between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def llama_quantizes(gguf_name: str, n_dims: int = 2) -> bool:
    """Whether llama-quantize quantizes this tensor at all (tensor_allows_quantization, dense models)."""
    name = _with_weight(gguf_name)
    return n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _with_weight(name: str) -> str:
    return name if name.endswith((".weight", ".bias")) else name + ".weight"


def _category(name: str) -> str:
    """tensor_get_category, with attn_qkv / attn_kv_b folded into attn_v as category_is_attn_v does."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_v"),
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return cat
    return "other"


def _fallback(qtype: GGMLQuantizationType, n_per_row: int) -> GGMLQuantizationType:
    if n_per_row % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    if qtype not in _FALLBACK:
        raise ValueError(f"no fallback type for {qtype.name} with rows of {n_per_row}")
    fallback = _FALLBACK[qtype]
    return fallback if n_per_row % GGML_QUANT_SIZES[fallback][0] == 0 else T.F16


def ggml_mix_type(
    mix: str,
    gguf_name: str,
    *,
    n_per_row: int,
    layer_index: int = 0,
    n_layers: int = 1,
    has_output: bool = True,
    llama_70b: bool = False,
) -> GGMLQuantizationType:
    """The ggml type llama-quantize gives the 2-D weight ``gguf_name`` (e.g. ``blk.3.attn_v``) in ``mix``.

    ``n_per_row`` is the row length (GGUF ne[0], the HF in_features). ``layer_index`` is the
    tensor's visit count among its kind (attn_v or ffn_down; see the module docstring), ``n_layers``
    the number of blocks. ``has_output`` is false when the model has no ``output.weight`` (tied
    embeddings: the token embedding is then quantized like the output). ``llama_70b`` is llama.cpp's
    LLM_TYPE_70B (80-layer llama with grouped-query attention), which bumps attn_v to Q5_K.
    """
    try:
        base = MIX_BASE_TYPE[mix.lower()]
    except KeyError:
        raise ValueError(f"unknown mix '{mix}'; known: {', '.join(MIX_BASE_TYPE)}") from None
    mix = mix.lower()
    category = _category(_with_weight(gguf_name))
    new_type = base
    if category == "output" or (category == "token_embd" and not has_output):
        # The output's own rule decides, before the fallback: Q8_0 when 256 does not divide the row.
        new_type = T.Q8_0 if n_per_row % GGML_QUANT_SIZES[base][0] else T.Q6_K
    elif category == "attn_v":
        if mix in ("q4_k_m", "q5_k_m") and use_more_bits(layer_index, n_layers):
            new_type = T.Q6_K
        elif mix == "q4_k_s" and layer_index < 4:
            new_type = T.Q5_K
        if llama_70b and new_type in (T.Q3_K, T.Q4_K):
            new_type = T.Q5_K
    elif category == "ffn_down":
        if mix in ("q4_k_m", "q5_k_m") and use_more_bits(layer_index, n_layers):
            new_type = T.Q6_K
        elif mix == "q4_k_s" and layer_index < n_layers // 8:
            new_type = T.Q5_K
    return _fallback(new_type, n_per_row)


def ggml_mix_plan(
    mix: str, tensors: Iterable[tuple[str, Sequence[int]]], order: str = "layer"
) -> dict[str, GGMLQuantizationType]:
    """Types for a whole model, counting layers as llama-quantize does.

    ``tensors`` are (GGUF name, shape in GGUF order: ne[0] = row length first), e.g. from
    ``gguf.GGUFReader(path).tensors``. ``order`` is ``"layer"`` (current llama.cpp) or ``"file"``
    (the given order, as older llama-quantize visited them). Tensors llama-quantize keeps as they
    are (norms, biases, 1-D) are left out of the result. For a model with tied embeddings leave
    ``output`` out (convert_hf_to_gguf writes no output.weight then): the token embedding then
    takes the output's type, as in llama.cpp.
    """
    items = [(_with_weight(name), [int(n) for n in shape]) for name, shape in tensors]
    if order == "layer":

        def key(item: tuple[str, list[int]]) -> tuple[int, str]:
            match = _LAYER.match(item[0])
            return (int(match.group(1)) if match else -1, item[0])

        items = sorted(items, key=key)
    elif order != "file":
        raise ValueError(f"order must be 'layer' or 'file', not '{order}'")
    names = {name for name, _ in items}
    has_output = "output.weight" in names
    n_layers = len({m.group(1) for name in names if (m := _LAYER.match(name))})
    n_attn_v = sum(_category(name) == "attn_v" for name in names)
    seen = {"attn_v": 0, "ffn_down": 0}
    plan: dict[str, GGMLQuantizationType] = {}
    for name, shape in items:
        if not llama_quantizes(name, len(shape)):
            continue
        category = _category(name)
        index = seen.get(category, 0)
        plan[name] = ggml_mix_type(
            mix,
            name,
            n_per_row=shape[0],
            layer_index=index,
            n_layers=n_attn_v if category == "attn_v" else n_layers,
            has_output=has_output,
        )
        if category in seen:
            seen[category] += 1
    return plan


# ------------------------------------------------------------------------ Hugging Face -> GGUF names

_HF_LAYER = re.compile(r"^(?:model\.|language_model\.model\.|model\.language_model\.)?layers\.(\d+)\.(.+)$")
_HF_TOP = {
    "model.embed_tokens": "token_embd",
    "embed_tokens": "token_embd",
    "language_model.model.embed_tokens": "token_embd",
    "model.language_model.embed_tokens": "token_embd",
    "lm_head": "output",
    "language_model.lm_head": "output",
    "model.norm": "output_norm",
    "norm": "output_norm",
    "language_model.model.norm": "output_norm",
    "model.language_model.norm": "output_norm",
}
_HF_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def hf_to_gguf_name(hf_name: str, arch: str = "llama") -> str | None:
    """``model.layers.3.self_attn.v_proj`` -> ``blk.3.attn_v`` (a ``.weight``/``.bias`` suffix is kept).

    For llama, qwen2 and gemma3 (whose post_attention_layernorm is its own tensor, not the ffn norm).
    None for a name with no GGUF counterpart here.
    """
    suffix = ""
    for end in (".weight", ".bias"):
        if hf_name.endswith(end):
            hf_name, suffix = hf_name[: -len(end)], end
    if hf_name in _HF_TOP:
        return _HF_TOP[hf_name] + suffix
    match = _HF_LAYER.match(hf_name)
    if not match:
        return None
    layer, rest = match.groups()
    if rest == "post_attention_layernorm":
        gguf = "post_attention_norm" if arch.startswith("gemma") else "ffn_norm"
    else:
        gguf = _HF_BLOCK.get(rest)
    return None if gguf is None else f"blk.{layer}.{gguf}{suffix}"


# ------------------------------------------------------------------------ the mixes as methods


def mix_layer_type(mix: str, hf_name: str, in_features: int, model_config: Any) -> GGMLQuantizationType:
    """The type llama-quantize gives the Hugging Face Linear ``hf_name`` of a model with ``model_config``.

    Layers are counted by layer number, as current llama.cpp does. A model that ties its output to the
    token embedding has no ``output.weight`` in GGUF: its ``lm_head`` is the token embedding's data.
    """
    text = getattr(model_config, "text_config", model_config)
    arch = str(getattr(model_config, "model_type", "llama"))
    gguf_name = hf_to_gguf_name(hf_name, arch) or hf_name
    tied = bool(
        getattr(model_config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)
    )
    if tied and gguf_name.startswith("output"):
        gguf_name = "token_embd" + gguf_name[len("output") :]
    match = _LAYER.match(gguf_name)
    return ggml_mix_type(
        mix,
        gguf_name,
        n_per_row=in_features,
        layer_index=int(match.group(1)) if match else 0,
        n_layers=int(text.num_hidden_layers),
        has_output=not tied,
    )


def _layer_options(model: nn.Module, name: str, linear: nn.Linear, config: QuantConfig) -> dict[str, Any]:
    return {"ggml_type": mix_layer_type(config.method, name, linear.in_features, model.config)}


def _mix_method(name: str, description: str, bits: float) -> Method:
    return Method(
        name=name,
        options={
            # llama-quantize quantizes the output matrix too (Q6_K, or Q8_0 when 256 does not divide a row).
            "skip": Option(
                str,
                "none",
                help="'+'-separated module-name substrings left unquantized ('none': every Linear)",
            ),
            "compute": compute_option("fp16"),
        },
        linear_cls=GGMLLinear,
        description=description,
        bits=bits,
        layer_options=_layer_options,
    )


Q4_K_M = _mix_method(
    "q4_k_m",
    "llama.cpp Q4_K_M: Q4_K, with Q6_K for the output and for attn_v / ffn_down in the layers llama-quantize "
    "picks (32-block fallbacks where 256 does not divide a row)",
    4.5,
)
Q5_K_M = _mix_method(
    "q5_k_m",
    "llama.cpp Q5_K_M: Q5_K, with Q6_K for the output and for attn_v / ffn_down in the layers llama-quantize "
    "picks (32-block fallbacks where 256 does not divide a row)",
    5.5,
)
