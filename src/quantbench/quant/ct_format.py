"""The compressed-tensors format (what llm-compressor writes and vLLM serves natively): export of
quantbench checkpoints and import of llm-compressor's, bit for bit where the layouts map.

``config.json``'s ``quantization_config`` has ``quant_method: compressed-tensors``, a ``format`` and
``config_groups`` of schemes (``targets``, ``weights`` / ``input_activations`` QuantizationArgs), an
``ignore`` list of Linear layers left in float. Per quantized Linear (compressed-tensors 0.19):

* ``pack-quantized`` (W4A16 / W8A16, int, group or channel): ``weight_packed`` int32 ``[out, in*b/32]``,
  signed codes plus ``2**(b-1)`` packed along the input dimension, element ``i`` in bits ``b*i`` of
  word ``i // (32/b)`` (for b = 4, 8 the same words as GPTQ's ``qzeros`` packing); ``weight_scale``
  ``[out, n_groups]``; ``weight_shape`` ``[out, in]``; asymmetric only: ``weight_zero_point`` int32
  ``[out*b/32, n_groups]``, signed zero points plus ``2**(b-1)`` packed along the output dimension.
  Dequantized ``(q - zp) * scale`` with signed ``q``/``zp``, i.e. quantbench's ``(u - zero) * scale``.
* ``int-quantized`` (W8A8 int8): ``weight`` int8 ``[out, in]``, ``weight_scale`` ``[out, 1]``; activations
  dynamic per token, symmetric int8 (SmoothQuant's layout).
* ``float-quantized`` (FP8 W8A8): ``weight`` float8_e4m3fn, ``weight_scale`` ``[out, 1]``, activations
  dynamic per token (quantbench's ``fp8``, llm-compressor's ``FP8_DYNAMIC``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantbench.errors import CheckpointError
from quantbench.quant.config import QuantConfig, parse_spec

CT_VERSION = "0.19.0"  # the compressed-tensors release whose schema is written (llm-compressor 0.14's)
PACK, INT, FLOAT = "pack-quantized", "int-quantized", "float-quantized"
_PACK_BITS = (4, 8)  # what vLLM's WNA16 kernels take, and what packs into whole 32-bit words
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_COMPUTE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _args(
    num_bits: int,
    kind: str,
    strategy: str,
    symmetric: bool = True,
    group: int | None = None,
    dynamic: bool = False,
) -> dict[str, Any]:
    """A QuantizationArgs dict with the fields llm-compressor 0.14 writes."""
    return {
        "num_bits": num_bits,
        "type": kind,
        "symmetric": symmetric,
        "group_size": group,
        "strategy": strategy,
        "block_structure": None,
        "dynamic": dynamic,
        "actorder": None,
        "scale_dtype": None,
        "zp_dtype": None,
        "observer": None if dynamic else "minmax",
        "observer_kwargs": {},
    }


# --------------------------------------------------------------------------------------------------
# Export: one layer -> (format, scheme, tensors)


def pack_tensors(module: nn.Module) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """An RTN-layout layer (int4/int8/gptq/awq) as ``pack-quantized`` tensors."""
    from quantbench.quant.export import layer_parts, pack_cols, pack_rows

    parts = layer_parts(module)  # type: ignore[arg-type]
    bits = parts["bits"]
    if bits not in _PACK_BITS:
        raise CheckpointError(
            f"compressed-tensors pack-quantized export takes 4/8-bit codes, this layer has {bits}"
        )
    g_idx = getattr(module, "g_idx", None)
    if g_idx is not None and not torch.equal(
        g_idx.long(), torch.arange(module.in_features, device=g_idx.device) // module.group
    ):
        raise CheckpointError(
            "compressed-tensors 0.19 decompresses without g_idx: export act_order GPTQ (no static_groups) with --format gptq"
        )
    per_channel = module.group == module.in_features
    sym = module.qzeros is None
    weights = _args(
        bits, "int", "channel" if per_channel else "group", sym, None if per_channel else module.group
    )
    tensors = {
        "weight_packed": pack_cols(parts["codes"], bits),
        "weight_scale": parts["scales"].contiguous(),
        "weight_shape": torch.tensor([module.out_features, module.in_features], dtype=torch.int64),
    }
    if not sym:
        if module.out_features % (32 // bits):
            raise CheckpointError(f"cannot pack zero points of {module.out_features} rows into 32-bit words")
        tensors["weight_zero_point"] = pack_rows(parts["zeros"], bits)
    return PACK, {"weights": weights, "input_activations": None}, tensors


def _w8a8_tensors(
    fmt: str, kind: str, weight: torch.Tensor, scale: torch.Tensor
) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """8-bit weights with per-channel scales and dynamic per-token 8-bit activations."""
    scheme = {
        "weights": _args(8, kind, "channel"),
        "input_activations": _args(8, kind, "token", dynamic=True),
    }
    tensors = {
        "weight": weight.contiguous(),
        "weight_scale": scale.detach().float().reshape(-1, 1).contiguous(),
    }
    return fmt, scheme, tensors


def int8_tensors(module: nn.Module) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """A SmoothQuant layer as ``int-quantized`` W8A8 (int8 weights per channel, int8 tokens)."""
    return _w8a8_tensors(INT, "int", module.row_major("qweight"), module.wscales)


def fp8_tensors(module: nn.Module) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """An FP8 layer as ``float-quantized`` (e4m3 weights per channel, dynamic e4m3 tokens)."""
    return _w8a8_tensors(FLOAT, "float", module.row_major("qweight"), module.weight_scale)


def layer_tensors(module: nn.Module) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(format, scheme, tensors) of one quantized layer, or :class:`CheckpointError` for a layout
    compressed-tensors has no exact counterpart for."""
    from quantbench.quant.fp8 import FP8Linear
    from quantbench.quant.rtn import RTNLinear
    from quantbench.quant.smoothquant import SmoothQuantLinear

    if isinstance(module, RTNLinear):
        return pack_tensors(module)
    if isinstance(module, SmoothQuantLinear):
        return int8_tensors(module)
    if isinstance(module, FP8Linear):
        return fp8_tensors(module)
    raise CheckpointError(
        f"{type(module).__name__} has no compressed-tensors layout; export int4/int8/gptq/awq, smoothquant or fp8"
    )


def quantization_config(
    schemes: dict[str, tuple[str, dict[str, Any]]], ignore: list[str], config: QuantConfig
) -> dict[str, Any]:
    """``quantization_config`` for layers -> (format, scheme): one group per distinct scheme, targeting
    every Linear when there is one, else naming its layers."""
    groups: dict[str, tuple[str, dict[str, Any], list[str]]] = {}
    for name, (fmt, scheme) in schemes.items():
        key = json.dumps([fmt, scheme], sort_keys=True)
        groups.setdefault(key, (fmt, scheme, []))[2].append(name)
    formats = {fmt for fmt, _, _ in groups.values()}
    config_groups = {
        f"group_{i}": {
            "targets": ["Linear"] if len(groups) == 1 else sorted(names),
            **scheme,
            "output_activations": None,
            "format": fmt,
        }
        for i, (fmt, scheme, names) in enumerate(groups.values())
    }
    return {
        "config_groups": config_groups,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "global_compression_ratio": None,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
        "quantbench": {"spec": config.spec, "method": config.method},
    }


def export_tensors(model: nn.Module, config: QuantConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All tensors of the export (quantized layers in compressed-tensors form, the rest as they are)
    and its ``quantization_config``."""
    from quantbench.quant.base import QuantLinear

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quantized:
        raise CheckpointError(f"{config.spec} has no quantized layers to export")
    tensors: dict[str, torch.Tensor] = {}
    schemes: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, module in quantized.items():
        fmt, scheme, made = layer_tensors(module)
        schemes[name] = (fmt, scheme)
        for key, value in made.items():
            tensors[f"{name}.{key}"] = value.contiguous()
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().contiguous()
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    prefixes = tuple(f"{n}." for n in quantized)
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        if value.data_ptr() in seen:  # tied weights are stored once, as transformers does
            continue
        seen.add(value.data_ptr())
        tensors[key] = value.detach().contiguous()
    return tensors, quantization_config(schemes, ignore, config)


# --------------------------------------------------------------------------------------------------
# Import


def _matches(name: str, module_type: str, target: str) -> bool:
    """compressed-tensors' target rule: a class name, an exact layer name, or ``re:`` + a regex."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, module_type)


def scheme_of(name: str, qconf: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(format, group) that applies to Linear ``name``, or None when it is ignored / not targeted."""
    if any(_matches(name, "Linear", t) for t in qconf.get("ignore") or []):
        return None
    for group in (qconf.get("config_groups") or {}).values():
        if any(_matches(name, "Linear", t) for t in group.get("targets") or []):
            return str(group.get("format") or qconf.get("format")), group
    return None


def _smoothing_strength(recipe: str) -> float:
    """The migration strength of the recipe's SmoothQuantModifier (llm-compressor's default 0.5), or 0 for
    a W8A8 recipe without one (weights not smoothed). Read from the text: the recipe holds Python tuples,
    which a safe YAML load refuses."""
    if "SmoothQuantModifier" not in recipe:
        return 0.0
    match = re.search(r"smoothing_strength:\s*([0-9.eE+-]+)", recipe)
    return float(match.group(1)) if match else 0.5


def _spec_for(fmt: str, group: dict[str, Any], compute: str, recipe: str) -> str:
    """The quantbench spec whose layout holds this compressed-tensors scheme exactly."""
    w = group.get("weights") or {}
    acts = group.get("input_activations")
    bits, kind, strategy = w.get("num_bits"), w.get("type"), w.get("strategy")
    sym = bool(w.get("symmetric", True))
    what = f"{fmt} {kind}{bits} {strategy}" + (
        "" if acts is None else f" + {acts.get('type')}{acts.get('num_bits')} activations"
    )
    if (
        fmt == PACK
        and kind == "int"
        and bits in _PACK_BITS
        and acts is None
        and strategy in ("group", "channel")
    ):
        group_size = int(w["group_size"]) if strategy == "group" else -1
        opts = f"group={group_size},sym={int(sym)},compute={compute}"
        if "GPTQModifier" in recipe:
            return f"gptq:bits={bits},{opts}"
        if "AWQModifier" in recipe and bits == 4:
            return f"awq:{opts}"
        return f"int{bits}:{opts}"
    dynamic_token = acts is not None and acts.get("dynamic") is True and acts.get("strategy") == "token"
    if (
        fmt in (INT, "naive-quantized")
        and kind == "int"
        and bits == 8
        and strategy == "channel"
        and sym
        and dynamic_token
        and acts.get("type") == "int"
        and acts.get("num_bits") == 8
        and acts.get("symmetric", True)
    ):
        return f"smoothquant:alpha={_smoothing_strength(recipe)},compute={compute}"
    if (
        fmt in (FLOAT, "naive-quantized")
        and kind == "float"
        and bits == 8
        and strategy == "channel"
        and sym
        and dynamic_token
        and acts.get("type") == "float"
        and acts.get("num_bits") == 8
    ):
        return f"fp8:compute={compute}"
    raise CheckpointError(f"compressed-tensors scheme '{what}' has no exact quantbench layout")


def fill_layer(module: nn.Module, fmt: str, parts: dict[str, torch.Tensor], name: str) -> int:
    """Copy one layer's compressed-tensors tensors into a quantbench skeleton; returns how many scales
    did not convert exactly to the skeleton's scale dtype."""
    from quantbench.quant.export import unpack_cols, unpack_rows
    from quantbench.quant.fp8 import FP8Linear
    from quantbench.quant.rtn import RTNLinear, pack_int4
    from quantbench.quant.smoothquant import SmoothQuantLinear

    if "weight_g_idx" in parts:
        trivial = torch.arange(module.in_features) // getattr(module, "group", module.in_features)
        if not torch.equal(parts["weight_g_idx"].long(), trivial):
            raise CheckpointError(f"{name}: weight_g_idx (actorder=group) has no quantbench layout")
    scale = parts["weight_scale"]
    if isinstance(module, RTNLinear) and fmt == PACK:
        bits = module.bits
        codes = unpack_cols(parts["weight_packed"], bits)[:, : module.in_features]
        if module.bits == 4:
            module.qweight.copy_(pack_int4(codes.to(torch.uint8)))
        else:
            module.qweight.copy_(codes.to(torch.uint8))
        scales = scale.reshape(module.out_features, -1)
        module.scales.copy_(scales)
        if module.qzeros is not None:
            zeros = unpack_rows(parts["weight_zero_point"], bits)[: module.out_features]
            module.qzeros.copy_(zeros.to(torch.uint8))
        return int((module.scales.float() != scales.float()).sum())
    if isinstance(module, SmoothQuantLinear) and fmt != PACK:
        module.qweight.copy_(parts["weight"].to(torch.int8))
        module.wscales.copy_(scale.reshape(-1))
        return 0
    if isinstance(module, FP8Linear) and fmt != PACK:
        module.qweight.copy_(parts["weight"])
        module.weight_scale.copy_(scale.reshape(-1))
        return 0
    raise CheckpointError(f"{name}: {fmt} tensors do not fit {type(module).__name__}")


def read_ct_config(src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, its compressed-tensors quantization_config)."""
    hf = json.loads((src / "config.json").read_text())
    qconf = hf.get("quantization_config") or {}
    if qconf.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"{src} is not a compressed-tensors checkpoint")
    if qconf.get("sparsity_config") or qconf.get("transform_config"):
        raise CheckpointError(
            f"{src}: sparse or transformed compressed-tensors checkpoints are not supported"
        )
    if qconf.get("quantization_status", "compressed") != "compressed":
        raise CheckpointError(
            f"{src}: quantization_status '{qconf.get('quantization_status')}' is not 'compressed'"
        )
    return hf, qconf


def plan_import(
    src: Path, state: dict[str, torch.Tensor], linear_names: list[str]
) -> tuple[QuantConfig, dict[str, str]]:
    """The quantbench config for a compressed-tensors directory and each quantized layer's format."""
    hf, qconf = read_ct_config(src)
    layers: dict[str, str] = {}
    specs: set[str] = set()
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16")
    compute = _COMPUTE.get(dtype, "bf16")
    recipe = (src / "recipe.yaml").read_text() if (src / "recipe.yaml").is_file() else ""
    for name in linear_names:
        found = scheme_of(name, qconf)
        if found is None:
            continue
        fmt, group = found
        if f"{name}.weight_scale" not in state:
            raise CheckpointError(f"{src}: {name} is targeted but has no weight_scale")
        layers[name] = fmt
        specs.add(_spec_for(fmt, group, compute, recipe))
    if not layers:
        raise CheckpointError(f"{src} has no quantized layers")
    if len(specs) != 1:
        raise CheckpointError(f"{src} mixes schemes {sorted(specs)}; a quantbench checkpoint holds one")
    spec = (qconf.get("quantbench") or {}).get("spec") or specs.pop()
    return parse_spec(spec), layers
