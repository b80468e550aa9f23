"""FP8 E4M3 W8A8: per-output-channel weight scales, dynamic per-token activation scales.

Weight ``w ≈ q * s_w`` with ``q`` in ``torch.float8_e4m3fn`` and ``s_w = absmax_row / 448`` (fp32), so
every channel uses the full e4m3 range. Each forward scales every token (row of x) the same way,
casts to e4m3 (round to nearest even) and computes ``(q_x @ q_w^T) * s_x * s_w`` with fp32 accumulation.

CUDA with compute capability >= 8.9 and bf16 compute runs that as one ``torch._scaled_mm`` with
row-wise scales; everything else (CPU, older GPUs, shapes that are not multiples of 16, fp16/fp32
compute, whose row-wise ``_scaled_mm`` output support depends on the torch/cuBLAS build) runs the
same math as an fp32 matmul of the dequantized codes.
"""

from __future__ import annotations

import torch
from torch import nn

from quantbench.quant.base import Method, QuantLinear
from quantbench.quant.config import COMMON_OPTIONS, QuantConfig, compute_option

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite e4m3fn value


def quantize_fp8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t [R, C]`` -> (e4m3 codes [R, C], fp32 scale [R]) with ``t ≈ codes * scale``, scale = absmax/448.

    Division by the scale is fp32; the result is clamped to ±448 because the rounded quotient of the
    largest element can land just above 448, which e4m3fn (no infinity) would turn into NaN.
    An all-zero row gets scale 0 and codes 0.
    """
    if FP8_DTYPE is None:
        raise RuntimeError("this torch has no float8_e4m3fn")
    t32 = t.float()
    scale = t32.abs().amax(dim=-1) / FP8_MAX
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = (t32 / safe.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale


def dequantize_fp8_rows(
    codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``codes * scale`` per row in fp32 (exact: a 4-bit significand times an fp32), cast to ``dtype``."""
    return (codes.float() * scale.unsqueeze(-1)).to(dtype)


def fp8_matmul_reference(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    w_codes: torch.Tensor,
    w_scale: torch.Tensor,
    dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(x_codes @ w_codes^T) * x_scale[:, None] * w_scale[None, :] + bias`` in fp32, rounded once to ``dtype``.

    Code products are exact in fp32 (two 4-bit significands); only the fp32 accumulation rounds, as
    in ``_scaled_mm``.
    """
    acc = x_codes.float() @ w_codes.float().t()
    out = acc * (x_scale.unsqueeze(-1) * w_scale.unsqueeze(0))
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def scaled_mm_ok(x: torch.Tensor, out_features: int, compute_dtype: torch.dtype) -> bool:
    """Whether the ``torch._scaled_mm`` path applies to ``x [M, K]``."""
    if not x.is_cuda or compute_dtype != torch.bfloat16 or not hasattr(torch, "_scaled_mm"):
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 9):
        return False  # no fp8 tensor cores before Ada / Hopper
    return x.shape[1] % 16 == 0 and out_features % 16 == 0


def fp8_linear(
    x: torch.Tensor,
    w_codes: torch.Tensor,
    w_scale: torch.Tensor,
    compute_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 product ``x [M, K] @ W^T + bias -> [M, N]`` in ``compute_dtype``."""
    x_codes, x_scale = quantize_fp8_rows(x)
    if scaled_mm_ok(x, w_codes.shape[0], compute_dtype):
        out = torch._scaled_mm(
            x_codes,
            w_codes.t(),  # [K, N] column-major view, as cuBLASLt wants
            scale_a=x_scale.unsqueeze(-1).contiguous(),
            scale_b=w_scale.unsqueeze(0).contiguous(),
            out_dtype=compute_dtype,
        )
        return out if bias is None else out + bias.to(compute_dtype)
    return fp8_matmul_reference(x_codes, x_scale, w_codes, w_scale, compute_dtype, bias)


class FP8Linear(QuantLinear):
    """FP8 E4M3 W8A8 Linear. Buffers: ``qweight`` float8_e4m3fn [out, in], ``weight_scale`` fp32 [out]."""

    method = "fp8"

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantConfig) -> None:
        super().__init__(in_features, out_features, bias, config)
        if FP8_DTYPE is None:
            raise RuntimeError("this torch has no float8_e4m3fn")
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32))

    @classmethod
    def supports(cls, linear: nn.Linear, config: QuantConfig) -> str | None:
        if FP8_DTYPE is None:
            return "this torch has no float8_e4m3fn"
        if linear.in_features == 0 or linear.out_features == 0:
            return "empty weight"
        return None

    def _quantize_from(self, weight: torch.Tensor) -> None:
        codes, scale = quantize_fp8_rows(weight)
        self.qweight.copy_(codes)
        self.weight_scale.copy_(scale)

    def dequantize(self) -> torch.Tensor:
        return dequantize_fp8_rows(self.row_major("qweight"), self.weight_scale, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        out = fp8_linear(x2, self.row_major("qweight"), self.weight_scale, self.compute_dtype, self.bias)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out.to(x.dtype) if x.dtype.is_floating_point else out


FP8 = Method(
    name="fp8",
    options={**COMMON_OPTIONS, "compute": compute_option("bf16")},
    linear_cls=FP8Linear,
    description="FP8 E4M3 W8A8: per-channel weight and per-token activation scales (torch._scaled_mm on sm89+)",
    bits=8,
)
