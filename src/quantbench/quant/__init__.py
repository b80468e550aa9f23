"""Quantization methods: one file each, registered here by spec name."""

from __future__ import annotations

from quantbench.quant.awq import AWQ
from quantbench.quant.base import Method, QuantLinear
from quantbench.quant.baseline import BF16, FP16, FP32
from quantbench.quant.bnb4 import FP4, NF4
from quantbench.quant.fp8 import FP8
from quantbench.quant.ggml_kquants import Q4_K, Q5_K, Q6_K
from quantbench.quant.ggml_legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
from quantbench.quant.ggml_mix import Q4_K_M, Q5_K_M
from quantbench.quant.gptq import GPTQ
from quantbench.quant.llm_int8 import LLM_INT8
from quantbench.quant.rtn import INT4, INT8
from quantbench.quant.smoothquant import SMOOTHQUANT

METHODS: dict[str, Method] = {m.name: m for m in (BF16, FP16, FP32, INT8, INT4, NF4, FP4, LLM_INT8, FP8)}
METHODS.update({m.name: m for m in (GPTQ, AWQ, SMOOTHQUANT)})  # calibrated methods
METHODS.update({m.name: m for m in (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)})  # llama.cpp block formats
METHODS.update({m.name: m for m in (Q4_K_M, Q5_K_M)})  # llama.cpp per-tensor mixes

from quantbench.quant.apply import QuantReport, quantize, weight_report  # noqa: E402
from quantbench.quant.config import QuantConfig, parse_spec  # noqa: E402

__all__ = [
    "METHODS",
    "Method",
    "QuantConfig",
    "QuantLinear",
    "QuantReport",
    "parse_spec",
    "quantize",
    "weight_report",
]
