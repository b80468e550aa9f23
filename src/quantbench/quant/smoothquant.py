"""SmoothQuant (Xiao et al. 2022) W8A8: move activation outliers into the weights, then int8 both.

Per decoder block, for the Linears fed by a norm (``input_layernorm -> q/k/v``,
``post_attention_layernorm -> gate/up``; with ``down=1`` also ``up -> down``), per input channel
``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` from calibration activations; the norm weight is
divided by ``s`` and the Linears' columns multiplied by it (the float model is unchanged). Then every
target Linear becomes :class:`SmoothQuantLinear`: int8 weights with one scale per output channel
(``absmax / 127``), activations quantized per token at run time (``absmax / 127``, symmetric), an
int8 x int8 -> int32 matmul (``torch._int_mm`` where the device and shapes allow it, else an exact
float64 matmul), and the two scales applied to the int32 result.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from quantbench.quant.awq import _get, fold_into_linear_rows, fold_into_norm, scale_linear_inputs
from quantbench.quant.base import QuantLinear
from quantbench.quant.blocks import BlockContext, input_hooks, run_block
from quantbench.quant.calibrated import CalibratedMethod, calibrated_quantize
from quantbench.quant.compute import linear
from quantbench.quant.config import COMMON_OPTIONS, Option, QuantConfig, compute_option

QMAX = 127
_MIN = 1e-8


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (codes int8 [out, in], scales float32 [out])."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / QMAX).clamp_min(_MIN)
    codes = torch.round(w / scales.unsqueeze(1)).clamp(-QMAX, QMAX).to(torch.int8)
    return codes, scales


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric int8 of ``x [tokens, in]`` (float32 math): (codes, scales [tokens, 1])."""
    x = x.float()
    scales = (x.abs().amax(dim=-1, keepdim=True) / QMAX).clamp_min(_MIN)
    codes = torch.round(x / scales).clamp(-QMAX, QMAX).to(torch.int8)
    return codes, scales


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a [m, k] int8 @ b_t.T`` (``b_t [n, k]`` int8) as exact int32 (``torch._int_mm`` when usable)."""
    m, k = a.shape
    n = b_t.shape[0]
    if can_int_mm(m, k, n, a.device):
        return torch._int_mm(a.contiguous(), b_t.t())
    # Exact: every partial sum of int8 products fits float64's 53-bit mantissa.
    return (a.double() @ b_t.double().t()).to(torch.int32)


def can_int_mm(m: int, k: int, n: int, device: torch.device) -> bool:
    if not hasattr(torch, "_int_mm"):
        return False
    if device.type == "cuda":
        return m > 16 and k % 8 == 0 and n % 8 == 0 and k >= 16
    return device.type == "cpu"


class SmoothQuantLinear(QuantLinear):
    """W8A8 Linear: ``qweight`` int8 [out, in], ``wscales`` float32 [out]; per-token int8 activations."""

    method = "smoothquant"

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantConfig) -> None:
        super().__init__(in_features, out_features, bias, config)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("wscales", torch.ones(out_features, dtype=torch.float32))

    def _quantize_from(self, weight: torch.Tensor) -> None:
        codes, scales = quantize_weight_int8(weight)
        self.qweight.copy_(codes)
        self.wscales.copy_(scales)

    def dequantize(self) -> torch.Tensor:
        return (self.row_major("qweight").float() * self.wscales.unsqueeze(1)).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        codes, scales = quantize_per_token(x.reshape(-1, shape[-1]))
        acc = int8_matmul(codes, self.row_major("qweight"))
        out = acc.float() * scales * self.wscales.unsqueeze(0)
        if self.bias is not None:
            out = out + self.bias.float()
        out = out.to(self.compute_dtype).reshape(*shape[:-1], self.out_features)
        return out.to(x.dtype) if x.dtype.is_floating_point else out

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quant path (dequantized int8 codes, float matmul in the compute dtype) for comparisons."""
        codes, scales = quantize_per_token(x.reshape(-1, x.shape[-1]))
        xq = (codes.float() * scales).to(self.compute_dtype)
        out = linear(xq, self.dequantize(), self.bias, self.cpu_fp16_kernel)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def smoothing_groups(layer: nn.Module, with_down: bool) -> list[tuple[str, nn.Module, dict[str, nn.Linear]]]:
    """(label, previous op, Linears it feeds) that smoothing can fold into."""
    groups: list[tuple[str, nn.Module, dict[str, nn.Linear]]] = []
    norm = _get(layer, "input_layernorm")
    qkv = {n: _get(layer, n) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
    if norm is not None and all(isinstance(m, nn.Linear) for m in qkv.values()):
        groups.append(("input_layernorm->qkv", norm, qkv))  # type: ignore[arg-type]
    mlp_norm = _get(layer, "pre_feedforward_layernorm") or _get(layer, "post_attention_layernorm")
    gate_up = {n: _get(layer, n) for n in ("mlp.gate_proj", "mlp.up_proj")}
    if mlp_norm is not None and all(isinstance(m, nn.Linear) for m in gate_up.values()):
        groups.append(("post_attention_layernorm->gate/up", mlp_norm, gate_up))  # type: ignore[arg-type]
    up, down = _get(layer, "mlp.up_proj"), _get(layer, "mlp.down_proj")
    if with_down and isinstance(up, nn.Linear) and isinstance(down, nn.Linear):
        groups.append(("up->down", up, {"mlp.down_proj": down}))
    return groups


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (channels never seen get 1)."""
    w_max = torch.stack([w.detach().abs().float().amax(dim=0) for w in weights]).amax(dim=0).clamp_min(1e-5)
    a = act_max.float().to(w_max.device).clamp_min(1e-5)
    s = (a.pow(alpha) / w_max.pow(1 - alpha)).clamp_min(1e-5)
    return torch.where(act_max.to(s.device) > 0, s, torch.ones_like(s))


def _process_block(ctx: BlockContext, config: QuantConfig, stats: dict[str, Any]) -> dict[str, nn.Module]:
    start = time.perf_counter()
    groups = smoothing_groups(ctx.layer, bool(config["down"])) if config["alpha"] > 0 else []
    leaders = {next(iter(lins)): label for label, _, lins in groups}
    act_max: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        m = x.detach().abs().amax(dim=0).float()
        act_max[name] = m if name not in act_max else torch.maximum(act_max[name], m)

    if leaders:
        hooked = {n: ctx.layer.get_submodule(n) for n in leaders}
        with input_hooks(hooked, observe, stop_after=set(hooked)):
            run_block(ctx.layer, ctx.inputs.hidden, ctx.kwargs, keep_outputs=False)
    elif stats.get("warned") is None and config["alpha"] > 0:
        ctx.log(f"smoothquant: {type(ctx.layer).__name__} has no known norm/Linear layout: no smoothing")
        stats["warned"] = True
    for _label, prev, linears in groups:
        leader = next(iter(linears))
        s = smoothing_scales(act_max[leader], [lin.weight for lin in linears.values()], config["alpha"])
        if isinstance(prev, nn.Linear):
            fold_into_linear_rows(prev, s)
        else:
            fold_into_norm(prev, s)
        for lin in linears.values():
            scale_linear_inputs(lin, s)
    made: dict[str, nn.Module] = {}
    for name, lin in ctx.targets.items():
        made[name] = SmoothQuantLinear.from_linear(lin, config)
    stats["smooth_s"] += time.perf_counter() - start
    return made


def quantize_model(
    model: nn.Module, config: QuantConfig, targets: dict[str, nn.Linear], **kwargs: Any
) -> dict:
    stats: dict[str, Any] = {"smooth_s": 0.0}
    return calibrated_quantize(
        model, config, targets, lambda ctx: _process_block(ctx, config, stats), stats=stats, **kwargs
    )


SMOOTHQUANT = CalibratedMethod(
    name="smoothquant",
    options={
        **COMMON_OPTIONS,
        "alpha": Option(
            float,
            0.5,
            check=lambda a: 0 <= a <= 1,
            check_text="a number in [0, 1]",
            help="migration strength",
        ),
        "down": Option(bool, False, help="also smooth down_proj's input, folded into up_proj"),
        "compute": compute_option(),
    },
    linear_cls=SmoothQuantLinear,
    description="SmoothQuant W8A8 (calibrated): smoothing folded into norms, int8 weights + per-token int8 acts",
    aliases={"migration": "alpha"},
    bits=8,
    quantize_model=quantize_model,
)
