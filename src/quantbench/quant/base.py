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
from torch import nn

from quantbench.quant.compute import linear
from quantbench.quant.config import Option, QuantConfig

# A faster forward for quantized layers that a higher layer provides: the CUDA engine registers its Triton
# kernels when ``quantbench.engine`` is imported (``import quantbench`` does). ``(module, x)`` -> the output,
# or None where it does not handle that module or input (the layer then runs its reference forward).
KernelForward = Callable[["QuantLinear", torch.Tensor], "torch.Tensor | None"]
_kernel_forward: KernelForward | None = None


def set_kernel_forward(forward: KernelForward | None) -> None:
    """Register the faster forward of quantized layers (None: reference forwards only)."""
    global _kernel_forward
    _kernel_forward = forward


def kernel_forward(module: QuantLinear, x: torch.Tensor) -> torch.Tensor | None:
    """The registered faster forward of ``module`` on ``x``, or None (none registered, or not handled)."""
    return None if _kernel_forward is None else _kernel_forward(module, x)


class QuantLinear(nn.Module):
    """Base for a quantized replacement of ``nn.Linear``.

    Subclasses implement ``_quantize_from(weight)`` (fill buffers from a float weight) and
    ``dequantize()`` (float weight ``[out, in]`` in the compute dtype). The default ``forward``
    is the pure-torch reference: dequantize, then a dense matmul in the compute dtype (on CPU, fp16
    runs with fp32 accumulation as on a GPU, at fp32 speed: :mod:`quantbench.quant.compute`).
    """

    method: ClassVar[str] = ""
    # How a CPU fp16 matmul runs (quantbench.quant.compute.CPU_FP16_KERNELS); set per model with
    # quantbench.quant.apply.set_cpu_fp16_kernel. Other devices and dtypes ignore it.
    cpu_fp16_kernel: str = "auto"

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
    def from_linear(cls, linear: nn.Linear, config: QuantConfig, **layer_options: Any) -> QuantLinear:
        """Quantize ``linear``; ``layer_options`` go to the constructor (a mix's per-layer format)."""
        module = cls(
            linear.in_features, linear.out_features, linear.bias is not None, config, **layer_options
        )
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
        out = linear(x.to(self.compute_dtype), self.dense_weight(), self.bias, self.cpu_fp16_kernel)
        return out.to(x.dtype) if x.dtype.is_floating_point else out

    # ---- tile-major storage (the CUDA engine's batch-1 GEMV streams contiguous tiles) ----
    # ``_tiling`` maps a buffer name to (tile rows, tile columns) of its logical 2-D form
    # ``[out_features, -1]``; the data is stored as ``[rows / tr, cols / tc, tr, tc]`` in the same
    # memory. Empty (the default): every buffer is row-major.

    @property
    def tiling(self) -> dict[str, tuple[int, int]]:
        return self.__dict__.get("_tiling", {})

    def store_tiled(self, tiles: dict[str, tuple[int, int]]) -> None:
        """Permute the named buffers in place into tile-major order (no new memory is kept)."""
        if self.tiling:
            raise RuntimeError("buffers are already stored tile-major")
        with torch.no_grad():
            for name, (tr, tc) in tiles.items():
                flat = getattr(self, name).view(-1)
                rows = self.out_features
                cols = flat.numel() // rows
                tiled = flat.view(rows // tr, tr, cols // tc, tc).transpose(1, 2).contiguous()
                flat.copy_(tiled.view(-1))
        self.mark_tiled(tiles)

    def mark_tiled(self, tiles: dict[str, tuple[int, int]]) -> None:
        """Record that the named buffers already hold tile-major data (views of a fused module's
        buffers that ``store_tiled`` permuted)."""
        for name, (tr, tc) in tiles.items():
            buf = getattr(self, name)
            cols = buf.numel() // self.out_features
            if self.out_features % tr or cols % tc or not buf.is_contiguous():
                raise ValueError(f"{name}: {tuple(buf.shape)} does not tile by ({tr}, {tc})")
        self.__dict__["_tiling"] = dict(tiles)

    def row_major(self, name: str) -> torch.Tensor:
        """Buffer ``name`` in its logical row-major layout (a copy when it is stored tile-major)."""
        buf = getattr(self, name)
        tile = self.tiling.get(name)
        if buf is None or tile is None:
            return buf
        tr, tc = tile
        rows = self.out_features
        cols = buf.numel() // rows
        return buf.view(rows // tr, cols // tc, tr, tc).transpose(1, 2).reshape(buf.shape)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # noqa: ANN001
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self.tiling:  # checkpoints are always row-major
            destination[prefix + name] = self.row_major(name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        if self.tiling:
            raise RuntimeError(
                "this layer's weights are stored tile-major for the CUDA engine; load the checkpoint into a fresh model"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
    # Per-layer constructor arguments (model, layer name, nn.Linear, config) -> kwargs of ``linear_cls``:
    # for a mix that picks each layer's format from its place in the model (llama.cpp's Q4_K_M). Used
    # both when quantizing and when a checkpoint's skeleton is rebuilt, so both give the same layers.
    layer_options: Callable[[nn.Module, str, nn.Linear, QuantConfig], dict[str, Any]] | None = None

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
