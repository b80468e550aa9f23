"""Fast inference for quantized Llama/Mistral/Qwen2 models: static KV cache, CUDA-graph decode,
Triton kernels for the quantized linears (``engine.kernels``); HF ``generate`` for the rest."""

from __future__ import annotations

from quantbench.engine.generate import Engine, Timing, sample
from quantbench.engine.model import EngineModel, unsupported_reason

__all__ = ["Engine", "EngineModel", "Timing", "sample", "unsupported_reason"]
