"""Export quantbench checkpoints to the GPTQ, AWQ (GEMM) and compressed-tensors formats that transformers /
vLLM load, and import such directories back into quantbench checkpoints, bit for bit. The per-layer
tensor layouts are :mod:`quantbench.quant.export`'s (GPTQ, AWQ) and :mod:`quantbench.quant.ct_format`'s
(compressed-tensors); this module reads and writes whole checkpoints around them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantbench.errors import CheckpointError
from quantbench.quant.config import QuantConfig, parse_spec
from quantbench.quant.export import (
    awq_tensors,
    gptq_tensors,
    unpack_awq,
    unpack_cols,
    unpack_rows,
)
from quantbench.quant.rtn import RTNLinear

FORMATS = ("gptq", "awq", "compressed-tensors")
_SKIP_FILES = {"model.safetensors", "quantbench.json", "config.json", "quantize_config.json"}


def _quantization_config(fmt: str, config: QuantConfig, group_sizes: set[int], bits: int) -> dict[str, Any]:
    if len(group_sizes) != 1:
        raise CheckpointError(f"{fmt} needs one group size for the model, found {sorted(group_sizes)}")
    group = group_sizes.pop()
    opts = config.options
    extra = {"quantbench": {"spec": config.spec, "method": config.method}}
    if fmt == "gptq":
        return {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group,
            "desc_act": bool(opts.get("act_order", False)),
            "sym": bool(opts.get("sym", True)),
            "static_groups": bool(opts.get("static_groups", False)),
            "true_sequential": bool(opts.get("true_sequential", True)),
            "damp_percent": float(opts.get("damp", 0.01)),
            "checkpoint_format": "gptq",
            "lm_head": False,
            **extra,
        }
    return {
        "quant_method": "awq",
        "bits": bits,
        "group_size": group,
        "zero_point": True,
        "version": "gemm",
        **extra,
    }


def export_checkpoint(
    ckpt_dir: str | Path, out_dir: str | Path, fmt: str = "gptq", overwrite: bool = False
) -> Path:
    """Write the quantbench checkpoint ``ckpt_dir`` to ``out_dir`` in ``fmt`` (``gptq``, ``awq`` or
    ``compressed-tensors``)."""
    from quantbench.checkpoint import load_quantized

    if fmt not in FORMATS:
        raise CheckpointError(f"unknown export format '{fmt}'; allowed: {', '.join(FORMATS)}")
    ckpt, out = Path(ckpt_dir), Path(out_dir)
    model, _ = load_quantized(ckpt)
    config: QuantConfig = model.quantbench_config
    if fmt == "compressed-tensors":
        from quantbench.quant.ct_format import export_tensors

        ct_tensors, ct_qconf = export_tensors(model, config)
        return _write_export(ckpt, out, ct_tensors, ct_qconf, config, overwrite, quantize_config=False)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, nn.Module) and hasattr(m, "qweight")}
    bad = [n for n, m in quantized.items() if not isinstance(m, RTNLinear)]
    if not quantized or bad:
        raise CheckpointError(
            f"{ckpt} ({config.spec}) is not in RTN's int layout (int4/int8/gptq/awq); cannot export to {fmt}"
        )
    tensors: dict[str, torch.Tensor] = {}
    group_sizes: set[int] = set()
    bits_seen: set[int] = set()
    for name, module in quantized.items():
        assert isinstance(module, RTNLinear)
        configured = config.options.get("group")
        group_sizes.add(int(configured) if configured is not None else module.group)
        bits_seen.add(module.bits)
        if fmt == "awq" and configured == -1:
            raise CheckpointError(
                "AWQ format needs a group size; per-channel (group=-1) checkpoints export as gptq"
            )
        made = gptq_tensors(module) if fmt == "gptq" else awq_tensors(module)
        for key, value in made.items():
            tensors[f"{name}.{key}"] = value.contiguous()
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().contiguous()
    prefixes = tuple(f"{n}." for n in quantized)
    seen_ptrs: set[int] = set()
    for key, value in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        ptr = value.data_ptr()
        if ptr in seen_ptrs:  # tied weights are stored once, as transformers does
            continue
        seen_ptrs.add(ptr)
        tensors[key] = value.detach().contiguous()
    qconf = _quantization_config(fmt, config, group_sizes, bits_seen.pop() if len(bits_seen) == 1 else 0)
    return _write_export(ckpt, out, tensors, qconf, config, overwrite, quantize_config=True)


def _write_export(
    ckpt: Path,
    out: Path,
    tensors: dict[str, torch.Tensor],
    qconf: dict[str, Any],
    config: QuantConfig,
    overwrite: bool,
    quantize_config: bool,
) -> Path:
    """Write the weights, ``config.json`` with ``qconf`` (and ``quantize_config.json`` for GPTQ/AWQ)
    and the checkpoint's tokenizer files."""
    from safetensors.torch import save_file

    from quantbench.outputs import atomic_dir, check_output_dir

    kind = "GPTQ/AWQ export" if quantize_config else "compressed-tensors export"
    check_output_dir(out, overwrite=overwrite, inputs=[ckpt], is_own=is_export_dir, kind=kind)
    hf = json.loads((ckpt / "config.json").read_text())
    hf["quantization_config"] = qconf
    hf["torch_dtype"] = hf["dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
        config.compute_dtype, "float32"
    )
    with atomic_dir(out) as tmp:  # a crash leaves an earlier export as it was
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if quantize_config:
            (tmp / "quantize_config.json").write_text(json.dumps(qconf, indent=2) + "\n")
        for path in ckpt.iterdir():
            if path.is_file() and path.name not in _SKIP_FILES:
                shutil.copy2(path, tmp / path.name)
    return out


def is_export_dir(path: str | Path) -> bool:
    """A directory written by :func:`export_checkpoint` (what ``--overwrite`` may replace)."""
    p = Path(path)
    if not all((p / name).is_file() for name in ("config.json", "model.safetensors")):
        return False
    if (p / "quantize_config.json").is_file():
        return True
    try:
        qconf = json.loads((p / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return qconf.get("quant_method") == "compressed-tensors" and "quantbench" in qconf


def _read_qconfig(src: Path) -> dict[str, Any]:
    cfg_path = src / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{cfg_path} is missing")
    hf = json.loads(cfg_path.read_text())
    qconf = hf.get("quantization_config")
    if qconf is None and (src / "quantize_config.json").exists():
        qconf = json.loads((src / "quantize_config.json").read_text())
    if not isinstance(qconf, dict) or qconf.get("quant_method", "gptq") not in FORMATS:
        raise CheckpointError(f"{src} has no GPTQ/AWQ quantization_config")
    qconf.setdefault("quant_method", "gptq")
    return qconf


def _decode_layer(fmt: str, tensors: dict[str, torch.Tensor], bits: int, v1: bool) -> dict[str, torch.Tensor]:
    """Format tensors of one layer -> codes/zeros ``[out, in]`` / ``[out, ng]``, scales, g_idx."""
    if fmt == "gptq":
        codes = unpack_rows(tensors["qweight"], bits).t()
        zeros = unpack_cols(tensors["qzeros"], bits).t()
        if v1:
            zeros = (zeros + 1) & (2**bits - 1)
        g_idx = tensors.get("g_idx")
    else:
        codes = unpack_awq(tensors["qweight"]).t()
        zeros = unpack_awq(tensors["qzeros"]).t()
        g_idx = None
    scales = tensors["scales"].t().to(torch.float16)
    out_f, in_f = codes.shape
    zeros = zeros[:out_f]
    return {"codes": codes, "zeros": zeros, "scales": scales, "g_idx": g_idx}


def import_checkpoint(src_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Turn a GPTQ, AWQ (GEMM) or compressed-tensors directory into a quantbench checkpoint (GPTQ / AWQ:
    method ``gptq`` / ``awq``; compressed-tensors: see :func:`quantbench.quant.ct_format.plan_import`)."""
    from quantbench.quant.rtn import pack_int4

    src = Path(src_dir)
    if _quant_method(src) == "compressed-tensors":
        return _import_compressed_tensors(src, out_dir, overwrite)
    qconf = _read_qconfig(src)
    fmt = qconf["quant_method"]
    bits = int(qconf.get("bits", 4))
    if fmt == "awq" and str(qconf.get("version", "gemm")).lower() != "gemm":
        raise CheckpointError(f"AWQ version '{qconf.get('version')}' not supported; only gemm")
    state = _load_state(src)
    layer_names = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    if not layer_names:
        raise CheckpointError(f"{src} has no quantized layers (no .qweight tensors)")
    v1 = fmt == "gptq" and qconf.get("checkpoint_format", "gptq") != "gptq_v2"
    decoded = {}
    for name in layer_names:
        parts = {
            k: state.pop(f"{name}.{k}")
            for k in ("qweight", "qzeros", "scales", "g_idx")
            if f"{name}.{k}" in state
        }
        decoded[name] = _decode_layer(fmt, parts, bits, v1)
    # Which spec: the one we exported, else one that describes the layout.
    spec = (qconf.get("quantbench") or {}).get("spec")
    half = 2 ** (bits - 1)
    all_sym = all(bool((d["zeros"] == half).all()) for d in decoded.values())
    group = int(qconf.get("group_size", -1))
    nontrivial_gidx = any(
        d["g_idx"] is not None
        and not torch.equal(
            d["g_idx"].long(),
            torch.arange(d["codes"].shape[1]) // (group if group > 0 else d["codes"].shape[1]),
        )
        for d in decoded.values()
    )
    if spec is not None:
        config = parse_spec(spec)
    elif fmt == "gptq":
        sym = bool(qconf.get("sym", True)) and all_sym
        config = parse_spec(
            f"gptq:bits={bits},group={group},sym={int(sym)},act_order={int(bool(qconf.get('desc_act')))},"
            f"static_groups={int(not nontrivial_gidx)}"
        )
    else:
        config = parse_spec(f"awq:group={group},sym={int(all_sym)}")

    def fill(name: str, module: nn.Module) -> None:
        if not isinstance(module, RTNLinear):
            raise CheckpointError(f"{config.method} does not use RTN's layout; cannot import into it")
        d = decoded[name]
        codes = d["codes"].to(torch.uint8)
        module.qweight.copy_(pack_int4(codes) if module.bits == 4 else codes)
        module.scales.copy_(d["scales"])
        if module.qzeros is not None:
            module.qzeros.copy_(d["zeros"].to(torch.uint8))
        elif not bool((d["zeros"] == half).all()):
            raise CheckpointError(
                f"{name}: zero points are not {half} but the spec {config.spec} is symmetric"
            )
        g_idx = getattr(module, "g_idx", None)
        if g_idx is not None:
            if d["g_idx"] is None:
                raise CheckpointError(f"{name}: spec {config.spec} needs g_idx, the file has none")
            g_idx.copy_(d["g_idx"].to(torch.int32))
        elif d["g_idx"] is not None and nontrivial_gidx:
            raise CheckpointError(f"{name}: the file's g_idx needs act_order without static_groups")

    return _assemble(src, config, layer_names, fill, state, f"import:{fmt}", {}, out_dir, overwrite)


def _quant_method(src: Path) -> str | None:
    try:
        hf = json.loads((src / "config.json").read_text())
    except (OSError, ValueError):
        return None
    qconf = hf.get("quantization_config") if isinstance(hf, dict) else None
    return qconf.get("quant_method") if isinstance(qconf, dict) else None


def _load_state(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{src} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def _import_compressed_tensors(src: Path, out_dir: str | Path, overwrite: bool) -> Path:
    from quantbench.quant import ct_format

    state = _load_state(src)
    linear_names = sorted(k[: -len(".weight_scale")] for k in state if k.endswith(".weight_scale"))
    config, layers = ct_format.plan_import(src, state, linear_names)
    names = sorted(layers)
    suffixes = (
        "weight",
        "weight_packed",
        "weight_scale",
        "weight_zero_point",
        "weight_shape",
        "weight_g_idx",
    )
    # Scales that do not convert exactly to quantbench's scale dtype (fp32 scales into RTN's fp16) are
    # counted in the manifest's source, so an inexact import is visible.
    extra = {"scales_rounded": 0}

    def fill(name: str, module: nn.Module) -> None:
        parts = {k: state.pop(f"{name}.{k}") for k in suffixes if f"{name}.{k}" in state}
        extra["scales_rounded"] += ct_format.fill_layer(module, layers[name], parts, name)

    return _assemble(src, config, names, fill, state, "import:compressed-tensors", extra, out_dir, overwrite)


def _assemble(
    src: Path,
    config: QuantConfig,
    layer_names: list[str],
    fill: Any,
    state: dict[str, torch.Tensor],
    source_spec: str,
    source_extra: dict[str, Any],
    out_dir: str | Path,
    overwrite: bool,
) -> Path:
    """Build the model of ``src``'s config with ``layer_names`` as empty ``config`` layers, ``fill`` them
    (name, module), load the remaining ``state`` and save the quantbench checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from quantbench.checkpoint import _no_init, save_quantized
    from quantbench.quant.apply import replace_with_empty

    hf_config = AutoConfig.from_pretrained(str(src), local_files_only=True)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    with _no_init():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=config.compute_dtype)
    replace_with_empty(model, config, layer_names)
    for name in layer_names:
        module = model.get_submodule(name)
        fill(name, module)
        bias = state.pop(f"{name}.bias", None)
        if bias is not None:
            module.bias.data = bias.to(module.bias.dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    quant_keys = {k for k in missing if k.startswith(tuple(f"{n}." for n in layer_names))}
    tied = {k for k in missing if "lm_head" in k and getattr(hf_config, "tie_word_embeddings", False)}
    if set(missing) - quant_keys - tied or unexpected:
        bad = sorted(set(missing) - quant_keys - tied) + sorted(unexpected)
        raise CheckpointError(f"{src} does not match its config (e.g. {bad[0]})")
    if tied:
        model.tie_weights()
    model.quantbench_config = config
    model.quantbench_skipped = {}
    model.quantbench_source = {"spec": source_spec, "path": str(src), **source_extra}
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError):
        pass
    return save_quantized(model, tokenizer, out_dir, overwrite=overwrite)
