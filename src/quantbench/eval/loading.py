"""Load a model for evaluation: a packaged name / HF dir / .gguf quantized on the fly, or a saved checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantbench.errors import ModelLoadError


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_checkpoint(path_or_spec: str) -> bool:
    from quantbench.checkpoint import MANIFEST_NAME

    path = Path(path_or_spec).expanduser()
    return path.is_dir() and (path / MANIFEST_NAME).exists()


def load_for_eval(
    model_spec: str, method: str | None = None, device: str | None = None, calib: str | None = None
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` ready to evaluate; ``model.quantbench_config.spec`` names the quantization.

    A quantbench checkpoint comes back as saved (``method`` must then be None or its own spec). Anything
    else is loaded in float32 and quantized with ``method`` (default ``bf16``: the unquantized baseline);
    calibrated methods (gptq, awq, smoothquant) calibrate on ``calib`` (default: the corpus' calibration
    slice), logging their progress to stderr.
    """
    import sys

    from quantbench import load_model, parse_spec, quantize
    from quantbench.quant.calib import parse_calib

    device = device or default_device()
    if is_checkpoint(model_spec):
        model, tokenizer = load_model(model_spec, device=device)
        saved = model.quantbench_config.spec
        if method is not None and parse_spec(method).spec != saved:
            raise ModelLoadError(f"{model_spec} is a checkpoint quantized with {saved}; drop --method")
        if tokenizer is None:
            raise ModelLoadError(f"{model_spec} has no tokenizer files")
        return model, tokenizer
    config = parse_spec(method or "bf16")  # fail on a bad spec before loading anything
    calib_spec = parse_calib(calib)
    model, tokenizer = load_model(model_spec, dtype="fp32", device=device)
    quantize(
        model, config, calib=calib_spec, tokenizer=tokenizer, log=lambda line: print(line, file=sys.stderr)
    )
    return model, tokenizer


def configure_threads(threads: int = 0) -> int:
    """Set torch's CPU threads and return the number used.

    ``threads > 0`` is used as given. ``0`` (auto) keeps torch's default unless other processes already
    keep the cores busy (1-minute load average): OpenMP threads that share a core with other work spin at
    every barrier and run several times slower than one thread, so auto uses only the idle cores (>= 1).
    """
    import os

    if threads > 0:
        torch.set_num_threads(threads)
        return threads
    default = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except OSError:
        return default
    idle = int((os.cpu_count() or default) - busy + 0.5)
    chosen = max(1, min(default, idle))
    torch.set_num_threads(chosen)
    return chosen


def enable_dequant_cache(model: nn.Module, device: str | torch.device, enabled: bool | None = None) -> bool:
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

    setter = getattr(apply, "set_dequant_cache", None)
    if setter is None:
        return False
    return bool(setter(model, enabled)) and enabled
