"""LLM.int8() (Dettmers et al. 2022): int8 weights and activations with fp16 outlier decomposition.

Weights: int8 codes per output row, ``w ≈ q * absmax_row / 127`` (bitsandbytes' ``CB``/``SCB``).
Forward, per call:

1. Outlier columns: input features whose |x| reaches ``threshold`` in any token (``>=``, as in
   bitsandbytes). Those columns are multiplied in the 16-bit compute dtype against the dequantized
   weight columns.
2. The other columns: x quantized to int8 per token (row absmax over the non-outlier columns),
   an exact int8 x int8 -> int32 matmul (``torch._int_mm``), rescaled by ``sx * sw`` in fp32.

``threshold=0`` turns the decomposition off (everything goes through int8). One deliberate
difference from bitsandbytes: its token absmax also counts the non-outlier entries of outlier
columns; here the token scale covers exactly the columns that are quantized (the paper's split).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantbench.quant.base import Method, QuantLinear
from quantbench.quant.compute import linear
from quantbench.quant.config import COMMON_OPTIONS, Option, QuantConfig

QMAX = 127


def quantize_int8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8: ``t [R, C]`` -> (int8 codes, fp32 row absmax [R]); ``t ≈ q * absmax / 127``.

    Same arithmetic as bitsandbytes' ``int8_vectorwise_quant`` (fp32, ``round(t * (127 / absmax))``,
    round half to even); an all-zero row gets absmax 0 and codes 0 instead of NaN.
    """
    t32 = t.float()
    absmax = t32.abs().amax(dim=-1)
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), QMAX / absmax)
    codes = torch.round(t32 * inv.unsqueeze(-1)).clamp(-QMAX, QMAX).to(torch.int8)
    return codes, absmax


def dequantize_int8_rows(
    codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``codes * (absmax / 127)`` per row, computed in fp32 then cast to ``dtype``."""
    return (codes.float() * (absmax / QMAX).unsqueeze(-1)).to(dtype)


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of the columns of ``x [M, K]`` with some ``|x| >= threshold`` (empty if threshold is 0)."""
    if threshold <= 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    return torch.nonzero((x.abs() >= threshold).any(dim=0)).flatten()


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a [M, K] int8 @ b [N, K]^T int8 -> int32 [M, N]``.

    CPU: ``torch._int_mm`` (any shape). CUDA: ``torch._int_mm`` needs M > 16 and K, N multiples of 8,
    so few-token inputs are padded with zero rows; other shapes use a float64 matmul, which is exact
    here because every partial sum is an integer below K * 127**2 << 2**53.
    """
    m, k = a.shape
    n = b.shape[0]
    if a.device.type == "cpu":
        return torch._int_mm(a, b.t())
    if a.is_cuda and k % 8 == 0 and n % 8 == 0:
        if m <= 16:
            return torch._int_mm(F.pad(a, (0, 0, 0, 17 - m)), b.t())[:m]
        return torch._int_mm(a, b.t())
    return (a.double() @ b.double().t()).to(torch.int32)


def llm_int8_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    row_absmax: torch.Tensor,
    threshold: float,
    compute_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    cpu_fp16_kernel: str = "auto",
) -> torch.Tensor:
    """LLM.int8() product ``x [M, K] @ W^T + bias -> [M, N]`` in ``compute_dtype``.

    The int8 part, the 16-bit outlier part and the bias are summed in fp32 and rounded once.
    ``cpu_fp16_kernel`` picks how the fp16 outlier product runs on CPU (``quantbench.quant.compute``).
    """
    cols = outlier_columns(x, threshold)
    x_rest = x
    if cols.numel():
        x_rest = x.clone()
        x_rest[:, cols] = 0  # these columns go through the 16-bit path instead
    x_codes, x_absmax = quantize_int8_rows(x_rest)
    acc = int8_matmul(x_codes, qweight)
    out = acc.float() * ((x_absmax / QMAX).unsqueeze(-1) * (row_absmax / QMAX).unsqueeze(0))
    if cols.numel():
        w_cols = dequantize_int8_rows(qweight[:, cols], row_absmax, compute_dtype)
        out = out + linear(x[:, cols].to(compute_dtype), w_cols, None, cpu_fp16_kernel).float()
    if bias is not None:
        out = out + bias.float()
    return out.to(compute_dtype)


class LLMInt8Linear(QuantLinear):
    """W8A8 Linear with outlier decomposition. Buffers: ``qweight`` int8 [out, in], ``row_absmax`` fp32 [out]."""

    method = "llm.int8"

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantConfig) -> None:
        super().__init__(in_features, out_features, bias, config)
        self.threshold = float(config["threshold"])
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("row_absmax", torch.zeros(out_features, dtype=torch.float32))

    @classmethod
    def supports(cls, linear: nn.Linear, config: QuantConfig) -> str | None:
        if linear.in_features == 0 or linear.out_features == 0:
            return "empty weight"
        return None

    def _quantize_from(self, weight: torch.Tensor) -> None:
        codes, absmax = quantize_int8_rows(weight)
        self.qweight.copy_(codes)
        self.row_absmax.copy_(absmax)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8_rows(self.row_major("qweight"), self.row_absmax, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        out = llm_int8_matmul(
            x2,
            self.row_major("qweight"),
            self.row_absmax,
            self.threshold,
            self.compute_dtype,
            self.bias,
            self.cpu_fp16_kernel,
        )
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out.to(x.dtype) if x.dtype.is_floating_point else out


LLM_INT8 = Method(
    name="llm.int8",
    options={
        **COMMON_OPTIONS,
        "threshold": Option(
            float,
            6.0,
            check=lambda t: t >= 0,
            check_text="a number >= 0 (0 = no outlier decomposition)",
            help="|activation| at which an input column is computed in 16-bit instead of int8",
        ),
        "compute": Option(str, "fp16", choices=("fp16", "bf16"), help="dtype of activations and outputs"),
    },
    linear_cls=LLMInt8Linear,
    description="LLM.int8(): int8 row-wise weights and per-token activations, fp16 outlier columns",
    aliases={"t": "threshold", "llm_int8_threshold": "threshold"},
    bits=8,
)
