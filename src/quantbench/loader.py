"""The one way every command gets a model to work on: ``load(model, method, calib=..., device=...)``.

``run``, ``sweep``, ``eval``, ``ppl``, ``lm-eval``, ``bench``, ``generate`` / ``chat`` / ``serve`` all call
:func:`load`, so a method means the same thing everywhere: the same load dtype, the same calibration data for
the calibrated methods (GPTQ, AWQ, SmoothQuant; default: the corpus' calibration slice, scaled to the
machine), the same checkpoint rules and the same CPU dequantization cache.

What it accepts as ``model_spec``:

* a packaged name, a Hugging Face directory or a ``.gguf`` file: loaded in ``dtype`` (float32 by default,
  so every quantizer sees full-precision weights) and quantized with ``method`` (default ``bf16``);
* a quantbench checkpoint: comes back as saved (``method`` must be None or its spec);
* ``random:ARCH[:field=int,...]``: random weights of a real architecture, built in ``dtype`` on the device
  (latency benchmarks of models that are not on disk; no tokenizer).

Layering: this module sits below eval / bench / serve and imports only quant, models, checkpoint and errors.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantbench.errors import ModelLoadError
from quantbench.quant import METHODS, QuantConfig, parse_spec, quantize
from quantbench.quant.calib import CalibSpec, parse_calib

RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to use, with what it took to get there."""

    model: nn.Module
    tokenizer: Any  # None only for random:ARCH models
    config: QuantConfig  # the quantization it carries (a checkpoint's own)
    device: str
    load_s: float
    quantize_s: float  # 0 for a checkpoint
    checkpoint: bool
    dequant_cache: bool
    calibration: dict[str, Any] | None  # calibrated methods: source, n_samples, seq_len, notes, seconds

    @property
    def spec(self) -> str:
        return self.config.spec


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_checkpoint(path_or_spec: str) -> bool:
    """A directory written by ``quantbench quantize`` (it has a quantbench manifest)."""
    from quantbench.checkpoint import MANIFEST_NAME

    path = Path(path_or_spec).expanduser()
    return path.is_dir() and (path / MANIFEST_NAME).exists()


def is_calibrated(method: str | QuantConfig) -> bool:
    """Whether the method needs calibration data (GPTQ, AWQ, SmoothQuant)."""
    config = parse_spec(method)
    return getattr(METHODS[config.method], "quantize_model", None) is not None


def set_dequant_cache(model: nn.Module, device: str | torch.device, enabled: bool | None = None) -> bool:
    """Keep quantized layers' dequantized weights between forwards (default: on for CPU).

    The CPU forward of a quantized layer is the pure-torch reference (dequantize, then a dense matmul);
    caching gives identical results without re-decoding every weight on every forward, at the cost of a
    16-bit copy of the quantized layers (visible in peak memory). Returns whether the cache is on.
    """
    if enabled is None:
        enabled = torch.device(device).type == "cpu"
    if getattr(model, "quantbench_config", None) is None:
        return False
    from quantbench.quant import apply

    return bool(apply.set_dequant_cache(model, enabled)) and enabled


def check_device(device: str | None) -> str:
    """``device`` or the default one; a CUDA device on a machine without one is an input error."""
    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("no CUDA device here; use --device cpu")
    return device


def load(
    model_spec: str,
    method: str | QuantConfig | None = None,
    *,
    calib: str | CalibSpec | None = None,
    device: str | None = None,
    dtype: str | torch.dtype = "fp32",
    dequant_cache: bool | None = None,
    need_tokenizer: bool = True,
    log: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load ``model_spec`` and quantize it with ``method`` (see the module docstring).

    ``calib`` is used by calibrated methods only (``SOURCE[:NxL]``; None: the default calibration set).
    ``dtype`` is the dtype weights are loaded in before quantizing. ``dequant_cache`` (None: on for CPU)
    is :func:`set_dequant_cache`. ``log`` gets calibration progress (default: stderr). Bad specs fail with a
    one-line error before anything is loaded.
    """
    from quantbench.models import load_model

    device = check_device(device)
    say = log or (lambda line: print(line, file=sys.stderr))
    t0 = time.perf_counter()
    if is_checkpoint(model_spec):
        model, tokenizer = load_model(model_spec, device=device)
        saved = model.quantbench_config
        if method is not None and parse_spec(method).spec != saved.spec:
            raise ModelLoadError(f"{model_spec} is a checkpoint quantized with {saved.spec}; drop the method")
        if tokenizer is None and need_tokenizer:
            raise ModelLoadError(f"{model_spec} has no tokenizer files")
        return LoadedModel(
            model,
            tokenizer,
            saved,
            device,
            load_s=time.perf_counter() - t0,
            quantize_s=0.0,
            checkpoint=True,
            dequant_cache=set_dequant_cache(model, device, dequant_cache),
            calibration=(getattr(model, "quantbench_source", None) or {}).get("calibration"),
        )
    config = parse_spec(method or "bf16")  # fail on a bad spec before loading anything
    calibrated = is_calibrated(config)
    calib_spec = parse_calib(calib) if calibrated else None
    if model_spec.startswith(RANDOM_PREFIX):
        model, tokenizer = _random_model(model_spec, dtype, device), None
    else:
        model, tokenizer = load_model(model_spec, dtype=dtype, device=device)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {}
    if calibrated:
        kwargs = {"calib": calib_spec, "tokenizer": tokenizer, "device": device, "log": say}
    quantize(model, config, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    quantize_s = time.perf_counter() - t0
    return LoadedModel(
        model,
        tokenizer,
        config,
        device,
        load_s=load_s,
        quantize_s=quantize_s,
        checkpoint=False,
        dequant_cache=set_dequant_cache(model, device, dequant_cache),
        calibration=getattr(model, "quantbench_calibration", None) if calibrated else None,
    )


def _random_model(model_spec: str, dtype: str | torch.dtype, device: str) -> nn.Module:
    """``random:ARCH[:field=int,...]``, e.g. ``random:qwen2.5-0.5b:num_hidden_layers=2``."""
    from quantbench.models import random_model

    arch, _, rest = model_spec[len(RANDOM_PREFIX) :].partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = int(value)
        except ValueError:
            raise ModelLoadError(f"random model override '{item}' is not field=integer") from None
    return random_model(arch, dtype=dtype, device=device, **overrides)
