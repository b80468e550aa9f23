"""Evaluation-side helpers: CPU threads, and the names the eval layer used before :mod:`quantbench.loader`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantbench import loader

# The loader lives below eval (quantbench.loader); these names stay for the eval layer's callers.
default_device = loader.default_device
is_checkpoint = loader.is_checkpoint


def load_for_eval(
    model_spec: str, method: str | None = None, device: str | None = None, calib: str | None = None
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from :func:`quantbench.loader.load` (the dequantization cache left off, as
    before: :func:`enable_dequant_cache` switches it)."""
    loaded = loader.load(model_spec, method, calib=calib, device=device, dequant_cache=False)
    return loaded.model, loaded.tokenizer


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
    """:func:`quantbench.loader.set_dequant_cache` (default: on for CPU); returns whether the cache is on."""
    return loader.set_dequant_cache(model, device, enabled)
