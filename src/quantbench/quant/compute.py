"""The dense matmul of a quantized layer in its compute dtype: the one place the CPU kernel is chosen.

A GPU runs an fp16 ``linear`` on fp16 operands with fp32 accumulation and rounds the result (bias
included) once to fp16. torch's CPU fp16 matmul computes the same thing (fp32 accumulation) but, on
CPUs without native fp16 arithmetic (no AVX512-FP16 / AMX-FP16), 4-5x slower than fp32. Since fp16
operands are exact in fp32 and the accumulation is fp32 either way, running the product as an fp32
matmul of the upcast operands and rounding once gives the same numbers (up to the order of the fp32
sums) at fp32 speed. With only a few rows (tokens) torch's fp16 kernel is the faster one: it is a
GEMV that reads the 2-byte weight once, while the emulation first writes a 4-byte copy of it; the
default ``auto`` kernel therefore emulates from ``EMULATE_MIN_ROWS`` rows on.

bf16 is left to torch: on CPU it goes through oneDNN (bf16 operands, fp32 accumulation, one rounding),
which is the GPU semantics already and measured faster than fp32 on AVX512-BF16 machines
(``benchmarks/fp16_compute_cpu.py``). CUDA and every other device always use ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# How a CPU fp16 linear runs: "emulated" = fp32 matmul of the fp16 operands, rounded once to fp16
# (the GPU semantics at fp32 speed); "torch" = torch's own CPU fp16 kernel (same semantics, ~4x slower
# than fp32 per row); "auto" = "torch" below EMULATE_MIN_ROWS rows, else "emulated".
CPU_FP16_KERNELS = ("auto", "emulated", "torch")
# Where the two tie on a 2-core AVX512 CPU without native fp16 (benchmarks/fp16_compute_cpu.py --rows,
# one 4864x896 weight): torch's fp16 GEMV takes ~0.42 ms per row; the emulation ~3 ms (upcast of the
# weight, memory-bound fp32 matmul) plus ~0.1 ms per row: 1 row 0.43 vs 1.8 ms, 8 rows 3.4 vs 3.9 ms,
# 16 rows 7.0 vs 4.7 ms: a tie near 10 rows. Both give the same numbers, so this only moves time.
EMULATE_MIN_ROWS = 12


def linear_fp16_emulated(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` as a GPU computes it in fp16: fp16 operands, fp32 accumulation, fp16 result.

    ``x`` is rounded to fp16 first (a no-op when it already is); ``weight`` and ``bias`` must hold fp16
    values. Upcasting is exact, the fp32 matmul accumulates in fp32 and the bias is added in fp32
    before the single rounding to fp16, as cuBLAS does with its bias epilogue.
    """
    if weight.dtype != torch.float16 or (bias is not None and bias.dtype != torch.float16):
        raise TypeError(
            f"fp16 weight and bias expected, got {weight.dtype} / {None if bias is None else bias.dtype}"
        )
    x32 = x.to(torch.float16).float()
    b32 = None if bias is None else bias.float()
    return F.linear(x32, weight.float(), b32).to(torch.float16)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, cpu_fp16: str = "auto"
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` in the weight's dtype; CPU fp16 runs per ``cpu_fp16`` (see ``CPU_FP16_KERNELS``).

    Every other case (CUDA, bf16, fp32) is ``F.linear`` unchanged.
    """
    if weight.dtype == torch.float16 and weight.device.type == "cpu":
        if cpu_fp16 not in CPU_FP16_KERNELS:
            raise ValueError(f"cpu_fp16 must be one of {CPU_FP16_KERNELS}, got {cpu_fp16!r}")
        rows = x.numel() // max(x.shape[-1], 1)
        if cpu_fp16 == "emulated" or (cpu_fp16 == "auto" and rows >= EMULATE_MIN_ROWS):
            return linear_fp16_emulated(x, weight, bias)
    return F.linear(x, weight, bias)


# Attention of an fp16 model on CPU. A GPU's fp16 attention takes fp16 q/k/v, computes scores, softmax and
# the weighted sum with fp32 accumulation and returns fp16. torch's CPU fp16 attention does the same
# arithmetic in software fp16 kernels, several times slower than fp32 on long prompts; upcasting the fp16
# operands (exact) and rounding the fp32 result once to fp16 is the same computation at fp32 speed.
# Other dtypes and devices go to transformers' SDPA unchanged.
CPU_FP16_ATTENTION = "quantbench_cpu_fp16_sdpa"


def attention_fp16_emulated(module, query, key, value, attention_mask, **kwargs):  # noqa: ANN001, ANN201
    """transformers attention function: SDPA, with fp16 CPU operands computed in fp32 (see above)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.dtype != torch.float16 or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    mask = (
        attention_mask.float()
        if attention_mask is not None and attention_mask.is_floating_point()
        else attention_mask
    )
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask, **kwargs)
    return out.to(torch.float16), weights


def use_fp16_attention_emulation(model: torch.nn.Module) -> bool:
    """Route ``model``'s attention through :func:`attention_fp16_emulated` if it uses transformers' SDPA.

    Returns whether it did. The choice is per model (its config); models on other attention kernels
    (eager, flash) are left alone.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", CPU_FP16_ATTENTION):
        return False
    AttentionInterface.register(CPU_FP16_ATTENTION, attention_fp16_emulated)
    AttentionMaskInterface.register(CPU_FP16_ATTENTION, sdpa_mask)
    model.set_attn_implementation(CPU_FP16_ATTENTION)
    return True
