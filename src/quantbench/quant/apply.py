"""Apply a method to a whole model: swap every eligible ``nn.Linear`` for the method's module."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from quantbench.errors import QuantConfigError
from quantbench.quant.base import QuantLinear
from quantbench.quant.compute import CPU_FP16_KERNELS, use_fp16_attention_emulation
from quantbench.quant.config import QuantConfig, parse_spec

BASELINE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class QuantReport:
    """What quantization did to a model, in bytes and bits per weight."""

    spec: str
    quantized_layers: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> reason
    quantized_weights: int = 0  # number of weight elements in quantized layers
    quantized_bytes: int = 0  # their storage now: codes + scales + zeros (bias excluded)
    model_bytes_16bit: int = 0  # whole model if every float tensor were 16-bit
    model_bytes: int = 0  # whole model as stored now

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight of the quantized layers, scales and zero points included."""
        if not self.quantized_weights:
            return 16.0
        return 8.0 * self.quantized_bytes / self.quantized_weights

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bits_per_weight": self.bits_per_weight}


def _unique_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    seen: set[tuple[int, int]] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.data_ptr(), tensor.numel())
        if tensor.numel() and key in seen:
            continue  # tied weights count once
        seen.add(key)
        yield tensor


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (tied tensors counted once)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model))


def weight_report(model: nn.Module, spec: str | None = None) -> QuantReport:
    """Describe the model as it stands (quantized or not)."""
    config: QuantConfig | None = getattr(model, "quantbench_config", None)
    report = QuantReport(spec=spec or (config.spec if config else "unknown"))
    report.skipped = dict(getattr(model, "quantbench_skipped", {}))
    for module in model.modules():
        if isinstance(module, QuantLinear):
            report.quantized_layers += 1
            report.quantized_weights += module.in_features * module.out_features
            bias_bytes = 0 if module.bias is None else module.bias.numel() * module.bias.element_size()
            report.quantized_bytes += module.storage_bytes() - bias_bytes
    report.model_bytes = model_bytes(model)
    report.model_bytes_16bit = sum(
        t.numel() * 2 if t.is_floating_point() else t.numel() * t.element_size()
        for t in _unique_tensors(model)
    )
    if report.quantized_layers:
        # Count the 16-bit size of the quantized layers as if unquantized.
        packed = report.quantized_bytes
        report.model_bytes_16bit += report.quantized_weights * 2 - packed
    return report


def _cast_floating(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast float params/buffers of ``module`` to ``dtype``, leaving QuantLinear storage alone."""
    for child in module.children():
        if not isinstance(child, QuantLinear):
            _cast_floating(child, dtype)
    for param in module.parameters(recurse=False):
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    for name, buf in module.named_buffers(recurse=False):
        # Non-persistent buffers (rotary inv_freq) stay fp32, as transformers keeps them.
        if name in module._non_persistent_buffers_set:
            continue
        if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
            module._buffers[name] = buf.to(dtype)


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the model's float tensors (not quantized storage) to ``dtype``; an fp16 model's attention on
    CPU then runs as a GPU's fp16 attention does, at fp32 speed (:mod:`quantbench.quant.compute`)."""
    _cast_floating(model, dtype)
    if dtype == torch.float16:
        use_fp16_attention_emulation(model)


def eligible_linears(model: nn.Module, config: QuantConfig) -> Iterator[tuple[str, nn.Linear, str | None]]:
    """(name, module, reason-to-skip-or-None) for every nn.Linear in ``model``."""
    from quantbench.quant import METHODS

    linear_cls = METHODS[config.method].linear_cls
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, QuantLinear):
            continue
        reason = None
        hit = next((p for p in config.skip_patterns if p in name), None)
        if hit is not None:
            reason = f"skipped by pattern '{hit}'"
        elif linear_cls is not None:
            reason = linear_cls.supports(module, config)
        yield name, module, reason


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


CALIBRATION_KWARGS = frozenset({"calib", "tokenizer", "device", "batch_size", "log"})


def takes_calibration(config: str | QuantConfig) -> bool:
    """Whether the method calibrates on data (GPTQ, AWQ, SmoothQuant)."""
    from quantbench.quant import METHODS

    return getattr(METHODS[parse_spec(config).method], "quantize_model", None) is not None


def check_calib_option(config: str | QuantConfig, calib: object) -> None:
    """``--calib`` given to a method without calibration is a mistake, not something to ignore."""
    config = parse_spec(config)
    if calib is not None and str(calib).strip() and not takes_calibration(config):
        from quantbench.quant import METHODS

        calibrated = ", ".join(name for name, m in METHODS.items() if getattr(m, "quantize_model", None))
        raise QuantConfigError(
            f"--calib is only for calibrated methods ({calibrated}); {config.method} takes no calibration data"
        )


def shape_skips(skipped: dict[str, str]) -> dict[str, str]:
    """The layers left unquantized for a reason other than the ``skip`` pattern (their shape)."""
    return {name: why for name, why in skipped.items() if not why.startswith("skipped by pattern")}


def quantize(model: nn.Module, config: str | QuantConfig, **kwargs: Any) -> nn.Module:
    """Quantize ``model`` in place with a method spec (``"nf4:block=64,dq=1"``) and return it.

    Every ``nn.Linear`` is replaced unless its name matches the ``skip`` option (default
    ``lm_head``) or the method cannot handle its shape; the rest of the model is cast to the
    method's compute dtype. ``model.quantbench_config`` records the config and
    :func:`weight_report` tells bytes and bits per weight afterwards.
    """
    config = parse_spec(config)
    from quantbench.quant import METHODS

    method = METHODS[config.method]
    if method.linear_cls is None:
        set_compute_dtype(model, BASELINE_DTYPES[method.name])
        model.quantbench_config = config
        model.quantbench_skipped = {}
        return model

    skipped: dict[str, str] = {}
    targets: list[tuple[str, nn.Linear]] = []
    for name, module, reason in eligible_linears(model, config):
        if reason is None:
            targets.append((name, module))
        else:
            skipped[name] = reason
    if not targets:
        example = next(iter(shape_skips(skipped).items()), None) or next(iter(skipped.items()), None)
        why = f" (e.g. {example[0]}: {example[1]})" if example else " (the model has no linear layers)"
        raise QuantConfigError(f"{config.spec} quantizes no layer of this model: every one is skipped{why}")
    quantize_model = getattr(method, "quantize_model", None)
    if quantize_model is not None:
        # Calibrated methods (GPTQ, AWQ, SmoothQuant) walk the model block by block themselves;
        # kwargs carry calib=, tokenizer=, device=, batch_size=, log=.
        for name, new in quantize_model(model, config, dict(targets), **kwargs).items():
            _set_submodule(model, name, new)
    else:
        # Calibration arguments mean nothing to a method without calibration.
        kwargs = {k: v for k, v in kwargs.items() if k not in CALIBRATION_KWARGS}
        quantize_layer = getattr(method, "quantize_layer", None)
        for name, module in targets:
            extra = method.layer_options(model, name, module, config) if method.layer_options else {}
            new = (quantize_layer or method.linear_cls.from_linear)(module, config, **kwargs, **extra)
            _set_submodule(model, name, new)
    set_compute_dtype(model, config.compute_dtype)
    model.quantbench_config = config
    model.quantbench_skipped = skipped
    return model


def set_dequant_cache(model: nn.Module, enabled: bool = True) -> int:
    """Keep (or drop) each quantized layer's dequantized weight between forwards.

    For evaluation on the CPU reference path: results are identical, forwards are much faster,
    memory grows by a 16-bit copy of the quantized layers. Returns the number of layers changed.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.__dict__["cache_dequantized"] = enabled
            module.__dict__.pop("_dense_cache", None)
            count += 1
    return count


def set_cpu_fp16_kernel(model: nn.Module, kernel: str = "auto") -> int:
    """Choose how the quantized layers of ``model`` run an fp16 matmul on CPU (default ``auto``).

    ``emulated``: an fp32 matmul of the fp16 operands, rounded once to fp16 (a GPU's semantics at fp32
    speed); ``torch``: torch's own CPU fp16 kernel (the same semantics, ~4x slower per token, faster
    for a handful of tokens); ``auto``: whichever is faster for the number of tokens. See
    :mod:`quantbench.quant.compute`. Unquantized modules (``lm_head``, norms, attention) always run
    in torch's own kernels. Returns the number of layers changed.
    """
    if kernel not in CPU_FP16_KERNELS:
        raise ValueError(f"kernel must be one of {CPU_FP16_KERNELS}, got {kernel!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.cpu_fp16_kernel = kernel
            count += 1
    return count


def replace_with_empty(model: nn.Module, config: QuantConfig, layer_names: list[str]) -> None:
    """Swap the named Linears for empty quantized skeletons (used when loading a checkpoint)."""
    from quantbench.quant import METHODS

    method = METHODS[config.method]
    linear_cls = method.linear_cls
    assert linear_cls is not None
    for name in layer_names:
        old = model.get_submodule(name)
        extra = method.layer_options(model, name, old, config) if method.layer_options else {}
        new = linear_cls(old.in_features, old.out_features, old.bias is not None, config, **extra)
        _set_submodule(model, name, new.to(old.weight.device))
    set_compute_dtype(model, config.compute_dtype)
