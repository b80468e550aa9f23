"""Round-to-nearest (RTN) weight-only int8 / int4, per channel or group-wise, symmetric or not.

Layout (shared with GPTQ/AWQ later): unsigned codes ``u`` in ``[0, 2**bits - 1]``, one fp16 scale
and one zero point per group of ``group`` consecutive input columns, ``w ≈ (u - zero) * scale``.
Symmetric quantization fixes ``zero = 2**(bits-1)`` (so ``u - zero`` is the signed code) and stores
no zeros. int4 codes are packed two per byte, even column in the low nibble.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantbench.errors import QuantConfigError
from quantbench.quant.base import Method, QuantLinear, kernel_forward
from quantbench.quant.config import COMMON_OPTIONS, Option, QuantConfig, compute_option, group_option

SCALE_DTYPE = torch.float16
_MIN_SCALE = 1e-8  # keeps all-zero groups from dividing by zero


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes in [0, 15] of shape [..., n] (n even) into [..., n/2] bytes."""
    if codes.shape[-1] % 2:
        raise ValueError("pack_int4 needs an even number of columns")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: [..., n/2] bytes -> [..., n] uint8 codes."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def quantize_rtn(
    weight: torch.Tensor, bits: int, group: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize ``weight [out, in]`` to codes ``[out, in]`` (uint8), scales and zeros ``[out, n_groups]``.

    ``group=-1`` means one group per output channel. Returns ``zeros=None`` when ``sym``.
    """
    out_features, in_features = weight.shape
    group = in_features if group == -1 else group
    if in_features % group:
        raise ValueError(f"in_features {in_features} is not a multiple of group size {group}")
    w = weight.detach().to(torch.float32).reshape(out_features, in_features // group, group)
    qmax_unsigned = 2**bits - 1
    if sym:
        half = 2 ** (bits - 1)
        scale = (w.abs().amax(dim=-1) / (half - 1)).clamp_min(_MIN_SCALE).to(SCALE_DTYPE)
        q = torch.round(w / scale.float().unsqueeze(-1)).clamp(-half, half - 1)
        codes = (q + half).to(torch.uint8)
        zeros = None
    else:
        # Like GPTQ, the range always contains zero so that exact zeros stay exact.
        wmin = w.amin(dim=-1).clamp(max=0)
        wmax = w.amax(dim=-1).clamp(min=0)
        scale = ((wmax - wmin) / qmax_unsigned).clamp_min(_MIN_SCALE).to(SCALE_DTYPE)
        zero = torch.round(-wmin / scale.float()).clamp(0, qmax_unsigned)
        q = torch.round(w / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1)
        codes = q.clamp(0, qmax_unsigned).to(torch.uint8)
        zeros = zero.to(torch.uint8)
    return codes.reshape(out_features, in_features), scale, zeros


def dequantize_rtn(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Float weight ``[out, in]`` from unpacked codes; the group size follows from the shapes."""
    out_features, in_features = codes.shape
    n_groups = scales.shape[-1]
    c = codes.reshape(out_features, n_groups, in_features // n_groups).to(torch.float32)
    zero = torch.full_like(scales, 2 ** (bits - 1), dtype=torch.float32) if zeros is None else zeros.float()
    w = (c - zero.unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.reshape(out_features, in_features).to(dtype)


class RTNLinear(QuantLinear):
    """Weight-only int8/int4 Linear. Buffers: ``qweight`` (int4: packed), ``scales``, ``qzeros`` (asym)."""

    method = "rtn"

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantConfig) -> None:
        super().__init__(in_features, out_features, bias, config)
        self.bits = int(config["bits"])
        self.group = in_features if config["group"] == -1 else int(config["group"])
        self.sym = bool(config["sym"])
        n_groups = in_features // self.group
        cols = in_features // 2 if self.bits == 4 else in_features
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=SCALE_DTYPE))
        if self.sym:
            self.qzeros = None
        else:
            self.register_buffer("qzeros", torch.zeros(out_features, n_groups, dtype=torch.uint8))

    @classmethod
    def supports(cls, linear: nn.Linear, config: QuantConfig) -> str | None:
        group = config["group"]
        if group != -1 and linear.in_features % group:
            return f"in_features {linear.in_features} not a multiple of group {group}"
        if config["bits"] == 4 and linear.in_features % 2:
            return "odd in_features cannot be packed two per byte"
        return None

    def _quantize_from(self, weight: torch.Tensor) -> None:
        codes, scales, zeros = quantize_rtn(weight, self.bits, self.group, self.sym)
        self.qweight.copy_(pack_int4(codes) if self.bits == 4 else codes)
        self.scales.copy_(scales)
        if zeros is not None:
            self.qzeros.copy_(zeros)

    def codes(self) -> torch.Tensor:
        codes = self.row_major("qweight")
        return unpack_int4(codes) if self.bits == 4 else codes

    def dequantize(self) -> torch.Tensor:
        return dequantize_rtn(
            self.codes(), self.row_major("scales"), self.row_major("qzeros"), self.bits, self.compute_dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # W4A16 / W8A16 kernels where registered (base.kernel_forward); None = not handled
            out = kernel_forward(self, x)
            if out is not None:
                return out
        return super().forward(x)


def _validate(name: str, values: dict[str, Any]) -> None:
    if values["group"] != -1 and values["group"] < 8:
        raise QuantConfigError(f"{name}: option 'group' must be -1 or >= 8, got {values['group']}")


def _options(bits: int, default_group: int) -> dict[str, Option]:
    return {
        **COMMON_OPTIONS,
        "bits": Option(int, bits, choices=(bits,), help="code width (fixed by the method name)"),
        "group": group_option(default_group),
        "sym": Option(bool, True, help="symmetric (no zero point) when 1"),
        "compute": compute_option(),
    }


_FLAGS = {"sym": ("sym", True), "asym": ("sym", False)}

INT8 = Method(
    name="int8",
    options=_options(8, -1),
    linear_cls=RTNLinear,
    description="RTN weight-only int8 (W8A16), per channel by default",
    flags=_FLAGS,
    aliases={"group_size": "group", "gs": "group", "g": "group"},
    validate=_validate,
    bits=8,
)

INT4 = Method(
    name="int4",
    options=_options(4, 128),
    linear_cls=RTNLinear,
    description="RTN weight-only int4 (W4A16), group 128 by default, packed two per byte",
    flags=_FLAGS,
    aliases={"group_size": "group", "gs": "group", "g": "group"},
    validate=_validate,
    bits=4,
)
