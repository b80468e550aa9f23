"""Save a quantized model to a directory and load it back bit-exactly.

Layout: ``model.safetensors`` (every tensor, quantized buffers included), ``config.json``,
the tokenizer files, and ``quantbench.json``: the method spec, which layers are quantized,
the weight report and each file's size and sha256 (so truncation and corruption are caught).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantbench.errors import CheckpointError, QuantConfigError
from quantbench.quant.apply import BASELINE_DTYPES, replace_with_empty, weight_report
from quantbench.quant.base import QuantLinear
from quantbench.quant.config import QuantConfig, parse_spec

MANIFEST_NAME = "quantbench.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_quantized(model: nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write ``model`` (quantized with :func:`quantbench.quantize`, or a baseline) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config: QuantConfig | None = getattr(model, "quantbench_config", None)
    if config is None:
        raise CheckpointError("model is not quantized: call quantbench.quantize(model, spec) first")
    layers = [name for name, module in model.named_modules() if isinstance(module, QuantLinear)]
    _save_weights(model, out / WEIGHTS_NAME)
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    manifest = {
        "format": "quantbench",
        "version": FORMAT_VERSION,
        "quantization": config.to_dict(),
        "spec": config.spec,
        "quantized_layers": layers,
        "skipped": dict(getattr(model, "quantbench_skipped", {})),
        "source": getattr(model, "quantbench_source", {}),
        "report": weight_report(model).to_dict(),
        "files": {
            WEIGHTS_NAME: {"size": (out / WEIGHTS_NAME).stat().st_size, "sha256": _sha256(out / WEIGHTS_NAME)}
        },
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _save_weights(model: nn.Module, path: Path) -> None:
    """safetensors ``save_model``, except that a tensor viewing part of a larger storage (the engine's
    fused q/k/v and gate/up buffers) is written from a host copy; tied weights are still stored once."""
    from safetensors.torch import _remove_duplicate_names, save_file

    state = {}
    for name, tensor in model.state_dict().items():
        whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        state[name] = tensor if whole else tensor.to("cpu", copy=True)
    metadata: dict[str, str] = {}
    for kept, removed in _remove_duplicate_names(state).items():
        for name in removed:
            metadata[name] = kept
            del state[name]
    save_file(state, str(path), metadata=metadata or None)


def read_manifest(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / MANIFEST_NAME
    if not path.exists():
        raise CheckpointError(f"{ckpt_dir} is not a quantbench checkpoint: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != "quantbench":
        raise CheckpointError(f"{path} is not a quantbench manifest")
    return manifest


def _no_init() -> contextlib.AbstractContextManager:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _aliased_names(model: nn.Module) -> set[str]:
    """Names of tensors that share storage with another tensor of the model (tied weights)."""
    by_ptr: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_ptr.setdefault(tensor.data_ptr(), []).append(name)
    return {name for names in by_ptr.values() if len(names) > 1 for name in names}


def load_quantized(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Rebuild a model saved by :func:`save_quantized`; weights come back bit-identical."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt = Path(ckpt_dir)
    manifest = read_manifest(ckpt)
    try:
        quant = manifest["quantization"]
        config = parse_spec(quant["method"], overrides=quant.get("options", {}))
        layers = list(manifest["quantized_layers"])
        files = manifest["files"]
    except QuantConfigError as exc:
        raise CheckpointError(f"{ckpt / MANIFEST_NAME}: {exc}") from None
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{ckpt / MANIFEST_NAME} is missing field {exc}") from None
    for name, meta in files.items():
        path = ckpt / name
        if not path.exists():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"{path} is truncated or altered: {size} bytes, expected {meta['size']}")
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"{path} is corrupt: sha256 does not match the manifest")
    if not (ckpt / "config.json").exists():
        raise CheckpointError(f"{ckpt / 'config.json'} is missing")
    hf_config = AutoConfig.from_pretrained(str(ckpt), local_files_only=True)
    from quantbench.quant import METHODS

    method = METHODS[config.method]
    dtype = config.compute_dtype if method.linear_cls is not None else BASELINE_DTYPES[method.name]
    with _no_init():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.tie_weights()  # skipped by no_init_weights; tied tensors are saved once
    if layers:
        replace_with_empty(model, config, layers)
    try:
        missing, unexpected = load_model(model, str(ckpt / WEIGHTS_NAME), strict=False)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"{ckpt / WEIGHTS_NAME} cannot be read: {str(exc).splitlines()[0]}") from None
    # Tied weights are stored once (under either name) and loaded through the shared storage;
    # anything else missing means the file does not match the model.
    aliased = _aliased_names(model)
    bad = sorted(k for k in missing if k not in aliased) + sorted(unexpected)
    if bad:
        raise CheckpointError(f"{ckpt / WEIGHTS_NAME} does not match its manifest (e.g. {bad[0]})")
    model.to(device)
    model.eval()
    model.quantbench_config = config
    model.quantbench_skipped = dict(manifest.get("skipped", {}))
    source = dict(manifest.get("source", {}))
    source["checkpoint"] = str(ckpt)
    model.quantbench_source = source
    tokenizer = None
    with contextlib.suppress(OSError, ValueError):
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
