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


def is_checkpoint_dir(path: str | Path) -> bool:
    """A directory holding a quantbench manifest (whatever state its weights are in)."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST_NAME).is_file()


def _source_paths(model: nn.Module) -> list[str]:
    source = getattr(model, "quantbench_source", None) or {}
    return [str(source[k]) for k in ("path", "checkpoint", "spec") if isinstance(source.get(k), str)]


def check_checkpoint_out(
    out_dir: str | Path, overwrite: bool = False, inputs: Any = (), option: str = "--out"
) -> Path:
    """The checks of :func:`save_quantized`, to run before any work: ``out_dir`` may be new or empty; with
    ``overwrite`` it may be an existing quantbench checkpoint; it is never one of ``inputs`` (the model or
    checkpoint being read, a calibration file) nor a directory holding one of them."""
    from quantbench.outputs import check_output_dir

    return check_output_dir(
        out_dir, overwrite=overwrite, inputs=inputs, is_own=is_checkpoint_dir, option=option
    )


def save_quantized(model: nn.Module, tokenizer: Any, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` (quantized with :func:`quantbench.quantize`, or a baseline) to ``out_dir``.

    ``out_dir`` must be new or empty, or (with ``overwrite``) an existing quantbench checkpoint; the model's
    own source directory is refused. The files are written to a temporary directory that replaces
    ``out_dir`` only when complete, so an interrupted save leaves the previous one intact.
    """
    from quantbench.outputs import atomic_dir

    out = Path(out_dir)
    config: QuantConfig | None = getattr(model, "quantbench_config", None)
    if config is None:
        raise CheckpointError("model is not quantized: call quantbench.quantize(model, spec) first")
    check_checkpoint_out(out, overwrite=overwrite, inputs=_source_paths(model), option="output directory")
    layers = [name for name, module in model.named_modules() if isinstance(module, QuantLinear)]
    with atomic_dir(out) as tmp:
        _save_weights(model, tmp / WEIGHTS_NAME)
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
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
                WEIGHTS_NAME: {
                    "size": (tmp / WEIGHTS_NAME).stat().st_size,
                    "sha256": _sha256(tmp / WEIGHTS_NAME),
                }
            },
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
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


# The manifest's shape (a JSON-Schema subset, checked by :func:`_check_schema`; jsonschema is not a dependency).
_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
MANIFEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["format", "version", "quantization", "spec", "quantized_layers", "files"],
    "properties": {
        "format": {"const": "quantbench"},
        "version": {"type": "integer", "minimum": 1, "maximum": FORMAT_VERSION},
        "quantization": {
            "type": "object",
            "required": ["method"],
            "properties": {"method": {"type": "string", "minLength": 1}, "options": {"type": "object"}},
        },
        "spec": {"type": "string", "minLength": 1},
        "quantized_layers": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "skipped": {"type": "object", "additionalProperties": _STR},
        "source": {"type": "object"},
        "report": {
            "type": "object",
            "properties": {
                "spec": _STR,
                "quantized_layers": _INT,
                "skipped": {"type": "object"},
                "quantized_weights": _INT,
                "quantized_bytes": _INT,
                "model_bytes_16bit": _INT,
                "model_bytes": _INT,
                "bits_per_weight": {"type": "number", "minimum": 0},
            },
        },
        "files": {
            "type": "object",
            "required": [WEIGHTS_NAME],
            "propertyNames": {"pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$"},
            "additionalProperties": {
                "type": "object",
                "required": ["size", "sha256"],
                "properties": {"size": _INT, "sha256": {"type": "string", "pattern": r"^[0-9a-f]{64}$"}},
            },
        },
    },
}

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}
_ARTICLE = {"object": "an object", "array": "an array", "integer": "an integer"}


def _json_type(value: Any) -> str:
    for name, types in _TYPES.items():
        if isinstance(value, types) and not (isinstance(value, bool) and name != "boolean"):
            return name
    return "null" if value is None else type(value).__name__


def _check_schema(value: Any, schema: dict[str, Any], where: str) -> str | None:
    """The first way ``value`` breaks ``schema`` (a message naming the field), or None."""
    import math
    import re

    field = f"field '{where}'" if where else "the manifest"
    if "const" in schema and value != schema["const"]:
        return f"{field} must be {json.dumps(schema['const'])}"
    kind = schema.get("type")
    if kind is not None:
        actual = _json_type(value)
        ok = actual == kind or (kind == "number" and actual == "integer")
        if not ok:
            return f"{field} must be {_ARTICLE.get(kind, 'a ' + kind)}, not {actual}"
        if kind == "number" and not math.isfinite(value):
            return f"{field} must be a finite number"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{field} must be >= {schema['minimum']}, got {value}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{field} must be <= {schema['maximum']}, got {value}"
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            return f"{field} must not be empty"
        if "pattern" in schema and not re.fullmatch(schema["pattern"], value):
            return f"{field} is malformed ({value[:40]!r})"
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            if (msg := _check_schema(item, schema["items"], f"{where}[{i}]")) is not None:
                return msg
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                return f"{field} is missing '{key}'" if where else f"field '{key}' is missing"
        props = schema.get("properties", {})
        for key, item in value.items():
            sub = f"{where}.{key}" if where else str(key)
            if "propertyNames" in schema and (msg := _check_schema(key, schema["propertyNames"], sub)):
                return f"field '{where}' has a bad name {key[:40]!r}"
            child = props.get(key, schema.get("additionalProperties"))
            if isinstance(child, dict) and (msg := _check_schema(item, child, sub)) is not None:
                return msg
    return None


def validate_manifest(manifest: Any, path: str | Path = MANIFEST_NAME) -> dict[str, Any]:
    """``manifest`` if it has the shape of a quantbench manifest, else :class:`CheckpointError` naming the field."""
    if not isinstance(manifest, dict) or manifest.get("format") != "quantbench":
        raise CheckpointError(f"{path} is not a quantbench manifest")
    message = _check_schema(manifest, MANIFEST_SCHEMA, "")
    if message is not None:
        raise CheckpointError(f"{path}: {message}")
    return manifest


def read_manifest(ckpt_dir: str | Path) -> dict[str, Any]:
    """The checked manifest of a checkpoint directory (one-line :class:`CheckpointError` otherwise)."""
    path = Path(ckpt_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a quantbench checkpoint: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = (
            exc.msg
            if isinstance(exc, json.JSONDecodeError)
            else str(exc).splitlines()[0]
            if str(exc)
            else type(exc).__name__
        )
        raise CheckpointError(f"{path} is not valid JSON ({reason})") from None
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read: {exc.strerror}") from None
    return validate_manifest(manifest, path)


def manifest_config(manifest: dict[str, Any], path: str | Path = MANIFEST_NAME) -> QuantConfig:
    """The quantization config a (validated) manifest records."""
    quant = manifest["quantization"]
    try:
        return parse_spec(quant["method"], overrides=quant.get("options", {}))
    except QuantConfigError as exc:
        raise CheckpointError(f"{path}: field 'quantization': {str(exc).splitlines()[0]}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: field 'quantization.options' is invalid ({exc})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def verify_files(ckpt_dir: str | Path, manifest: dict[str, Any] | None = None, sha256: bool = True) -> None:
    """Every file the manifest lists exists with its size (and, with ``sha256``, its digest)."""
    ckpt = Path(ckpt_dir)
    manifest = manifest if manifest is not None else read_manifest(ckpt)
    for name, meta in manifest["files"].items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(
                f"{path} is truncated or altered: {size} bytes, the manifest says {meta['size']}"
            )
        if sha256 and _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"{path} is corrupt: sha256 does not match the manifest")


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = Path(ckpt_dir)
    manifest = read_manifest(ckpt)
    config = manifest_config(manifest, ckpt / MANIFEST_NAME)
    layers = list(manifest["quantized_layers"])
    verify_files(ckpt, manifest)
    if not (ckpt / "config.json").exists():
        raise CheckpointError(f"{ckpt / 'config.json'} is missing")
    from quantbench.models import read_hf_config

    hf_config = read_hf_config(ckpt, CheckpointError)
    from quantbench.quant import METHODS

    method = METHODS[config.method]
    dtype = config.compute_dtype if method.linear_cls is not None else BASELINE_DTYPES[method.name]
    with _no_init():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.tie_weights()  # skipped by no_init_weights; tied tensors are saved once
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    unknown = [name for name in layers if name not in linears]
    if unknown:
        raise CheckpointError(
            f"{ckpt / MANIFEST_NAME}: field 'quantized_layers' names '{unknown[0][:80]}', "
            "which is not a linear layer of this model"
        )
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
    from quantbench.models import has_tokenizer_files

    tokenizer = None
    if has_tokenizer_files(ckpt):
        with contextlib.suppress(OSError, ValueError, TypeError):
            tokenizer = AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
