"""Fast inference for quantized Llama/Mistral/Qwen2 models: static KV cache, CUDA-graph decode,
Triton kernels for the quantized linears (``engine.kernels``); the HF forward for the rest. One generation
loop (``engine.scheduler``) and one sampler (``engine.sampling``) serve bench, generate and serve.

Importing it registers the kernels as the CUDA forward of quantized layers (``quant.base.kernel_forward``),
so ``module(x)`` on CUDA runs them outside the engine too; ``import quantbench`` imports it."""

from __future__ import annotations

from quantbench.engine.generate import Engine, Timing
from quantbench.engine.kernels import dispatch
from quantbench.engine.model import EngineModel, unsupported_reason
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions, EngineOptionsError
from quantbench.engine.sampling import Sampling, sample_tokens
from quantbench.engine.scheduler import Request, Scheduler
from quantbench.quant.base import set_kernel_forward

# Quantized layers' own forward takes the kernels on CUDA (quant/ does not import the engine).
set_kernel_forward(dispatch)

__all__ = [
    "DEFAULT_OPTIONS",
    "Engine",
    "EngineModel",
    "EngineOptions",
    "EngineOptionsError",
    "Request",
    "Sampling",
    "Scheduler",
    "Timing",
    "sample_tokens",
    "unsupported_reason",
]
