"""Fast inference for quantized Llama/Mistral/Qwen2 models: static KV cache, CUDA-graph decode,
Triton kernels for the quantized linears (``engine.kernels``); HF ``generate`` for the rest."""

from __future__ import annotations

from quantbench.engine.generate import Engine, Timing, sample
from quantbench.engine.model import EngineModel, unsupported_reason
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions, EngineOptionsError

__all__ = [
    "DEFAULT_OPTIONS",
    "Engine",
    "EngineModel",
    "EngineOptions",
    "EngineOptionsError",
    "Timing",
    "sample",
    "unsupported_reason",
]
