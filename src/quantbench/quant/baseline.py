"""Unquantized baselines: the model cast to one float dtype, every Linear left as it is."""

from __future__ import annotations

from quantbench.quant.base import Method


def _baseline(name: str, description: str) -> Method:
    return Method(
        name=name, options={}, linear_cls=None, description=description, bits=32 if name == "fp32" else 16
    )


BF16 = _baseline("bf16", "no quantization, bfloat16 weights (the reference row)")
FP16 = _baseline("fp16", "no quantization, float16 weights")
FP32 = _baseline("fp32", "no quantization, float32 weights")
