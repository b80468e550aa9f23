"""What every quantization method provides: a ``Method`` entry and a ``QuantLinear`` module.

Each method file (rtn.py, bnb4.py, ...) holds pure tensor functions (quantize / dequantize /
pack) plus one ``QuantLinear`` subclass. The subclass allocates all its buffers in
``__init__`` from ``(in_features, out_features, bias, config)`` alone, so a saved checkpoint can
be rebuilt as an empty skeleton and filled by ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from quantbench.quant.config import Option, QuantConfig


class QuantLinear(nn.Module):
    """Base for a quantized replacement of ``nn.Linear``.

    Subclasses implement ``_quantize_from(weight)`` (fill buffers from a float weight) and
    ``dequantize()`` (float weight ``[out, in]`` in the compute dtype). The default ``forward``
    is the pure-torch reference: dequantize, then a dense matmul in the compute dtype.
    """

    method: ClassVar[str] = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantConfig) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        self.compute_dtype = config.compute_dtype
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.compute_dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def supports(cls, linear: nn.Linear, config: QuantConfig) -> str | None:
        """Return None if ``linear`` can be quantized with ``config``, else the reason it cannot."""
        return None

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> QuantLinear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, config)
        module.to(linear.weight.device)
        with torch.no_grad():
            module._quantize_from(linear.weight.detach())
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach().to(module.compute_dtype))
        return module

    def _quantize_from(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The float weight the reference forward multiplies with.

        With ``cache_dequantized`` on (see :func:`quantbench.quant.apply.set_dequant_cache`) it is
        computed once and kept: the same numbers, at the memory cost of a 16-bit copy. The CPU
        evaluation path uses it so a forward does not re-decode every weight; speed and memory
        are measured on the GPU kernels, not on this path.
        """
        cache = self.__dict__.get("_dense_cache")
        if cache is not None and cache.device == self.bias_or_buffer_device():
            return cache
        weight = self.dequantize()
        if self.__dict__.get("cache_dequantized", False):
            self.__dict__["_dense_cache"] = weight
        return weight

    def bias_or_buffer_device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.to(self.compute_dtype), self.dense_weight(), self.bias)
        return out.to(x.dtype) if x.dtype.is_floating_point else out

    def storage_bytes(self) -> int:
        """Bytes this layer stores (quantized weight, scales, zeros, bias)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.config.spec}"


@dataclass(frozen=True)
class Method:
    """Registry entry: how a method is spelled, what it accepts, which module implements it."""

    name: str
    options: dict[str, Option]
    linear_cls: type[QuantLinear] | None  # None: a baseline that only casts the model
    description: str
    flags: dict[str, tuple[str, Any]] = field(default_factory=dict)  # bare flag -> (key, value)
    aliases: dict[str, str] = field(default_factory=dict)  # alternative key spellings
    validate: Callable[[str, dict[str, Any]], None] | None = None
    bits: float = 16.0  # nominal bits of a weight code, for reports

    def table_fields(self, config: QuantConfig) -> dict[str, str]:
        """Columns of the comparison table: compute dtype, double quant, group/block size."""
        opts = config.options
        group = opts.get("group", opts.get("block"))
        return {
            "quant_type": self.name,
            "compute_dtype": str(opts.get("compute", self.name if self.linear_cls is None else "bf16")),
            "double_quant": ("yes" if opts["dq"] else "no") if "dq" in opts else "-",
            "group_size": "-" if group is None else ("channel" if group == -1 else str(group)),
        }
