"""GPTQ (Frantar et al. 2022): quantize a Linear column by column, spreading each column's rounding
error over the columns not yet quantized through the inverse Hessian ``H = X^T X / n`` of its
calibration inputs.

Storage is RTN's layout (``qweight``: int4 packed two per byte, low nibble = even column, else one
code per byte; ``scales`` fp16 ``[out, n_groups]``; ``qzeros`` uint8 when asymmetric), so the W4A16
kernels read it unchanged, plus ``g_idx`` (int32 ``[in]``: the group of each input column) only when
``act_order`` without ``static_groups`` makes groups that are not contiguous column ranges.

Grid: the same as RTN's (symmetric ``scale = absmax / (2**(bits-1) - 1)``, codes ``q + 2**(bits-1)``;
asymmetric min/max including 0), computed per group from the error-updated weights when the
group's first column comes up (or once from the original weights with ``static_groups``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantbench.quant.blocks import (
    BlockContext,
    cpu_single_thread,
    input_hooks,
    run_block,
    sequential_groups,
    set_submodule,
)
from quantbench.quant.calibrated import CalibratedMethod, calibrated_quantize
from quantbench.quant.config import COMMON_OPTIONS, Option, QuantConfig, compute_option, group_option
from quantbench.quant.rtn import SCALE_DTYPE, RTNLinear, _validate, pack_int4

_MIN_SCALE = 1e-8  # as RTN
DAMP_STEPS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # a failed Cholesky retries with the next damping up


class HessianError(RuntimeError):
    """The Hessian stayed singular even with the largest damping."""


# --------------------------------------------------------------------------------------------------
# Quantization grid (identical to rtn.quantize_rtn, one group at a time)


def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of ``w [rows, cols]``: float32 values, the scale already rounded to fp16."""
    qmax = 2**bits - 1
    if sym:
        half = 2 ** (bits - 1)
        scale = (w.abs().amax(dim=-1) / (half - 1)).clamp_min(_MIN_SCALE).to(SCALE_DTYPE).float()
        zero = torch.full_like(scale, float(half))
    else:
        wmin = w.amin(dim=-1).clamp(max=0)
        wmax = w.amax(dim=-1).clamp(min=0)
        scale = ((wmax - wmin) / qmax).clamp_min(_MIN_SCALE).to(SCALE_DTYPE).float()
        zero = torch.round(-wmin / scale).clamp(0, qmax)
    return scale, zero


def grid_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in [0, 2**bits-1] as float, dequantized values) of a column ``w [rows]``."""
    if sym:
        half = 2 ** (bits - 1)
        q = torch.round(w / scale).clamp(-half, half - 1)
        return q + half, q * scale
    codes = (torch.round(w / scale) + zero).clamp(0, 2**bits - 1)
    return codes, (codes - zero) * scale


# --------------------------------------------------------------------------------------------------
# The algorithm


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 [out, in], natural column order
    scales: torch.Tensor  # fp16 [out, n_groups]
    zeros: torch.Tensor | None  # uint8 [out, n_groups] (None when sym)
    g_idx: torch.Tensor | None  # int32 [in], only when groups are not contiguous
    damp: float  # damping actually used (fraction of the mean diagonal)
    retries: int  # how many times damping was raised
    loss: float  # sum over columns of err^2 / Hinv_ii^2 / 2, the GPTQ objective


def inverse_hessian_factor(
    H: torch.Tensor, damp: float, log: Callable[[str], None] | None = None, name: str = ""
) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; raise the damping until the
    matrix is positive definite (saying so through ``log``). Returns (factor, damp used, retries)."""
    mean_diag = float(torch.diagonal(H).mean())
    if not math.isfinite(mean_diag):
        raise HessianError(f"{name}: Hessian has non-finite entries")
    steps = [damp] + [d for d in DAMP_STEPS if d > damp]
    for retry, d in enumerate(steps):
        Hd = H.clone()
        Hd.diagonal().add_(d * mean_diag)
        # With J the reversal, J Hd J = M M^T gives Hd = R R^T with R = J M J upper triangular, so
        # Hd^-1 = R^-T R^-1 and R^-1 = J M^-1 J is the upper Cholesky factor of Hd^-1: one
        # factorization and one triangular inverse instead of cholesky + cholesky_inverse + cholesky.
        M, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))
        if int(info) == 0:
            eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
            U = torch.linalg.solve_triangular(M, eye, upper=False).flip(0, 1)
            if bool(torch.isfinite(U).all()):
                if retry and log is not None:
                    log(
                        f"GPTQ {name}: Hessian not positive definite with damp={damp}; "
                        f"retried {retry}x, used damp={d}"
                    )
                return U, d, retry
    raise HessianError(f"{name}: Hessian not positive definite even with damp={steps[-1]}")


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    group: int = 128,
    sym: bool = True,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    log: Callable[[str], None] | None = None,
    name: str = "",
    cuda_graphs: bool = True,
) -> GPTQResult:
    """GPTQ-quantize ``weight [out, in]`` given the Hessian ``H [in, in]`` of its inputs.

    Lazy batch updates: columns are processed in blocks of ``block_size``; inside a block the error
    is propagated column by column, to the rest of the matrix once per block. ``cuda_graphs``: on CUDA,
    replay each block's column loop as a CUDA graph where its shape allows (same results).
    """
    W = weight.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()
    rows, cols = W.shape
    grouped = group != -1 and group < cols
    gsize = group if grouped else cols
    if cols % gsize:
        raise ValueError(f"in_features {cols} not a multiple of group {gsize}")
    n_groups = cols // gsize

    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    static: tuple[torch.Tensor, torch.Tensor] | None = None
    if not grouped:
        static = grid_params(W, bits, sym)  # one (scale, zero) per row
        static = (static[0].unsqueeze(1), static[1].unsqueeze(1))
    elif static_groups:
        s, z = grid_params(W.reshape(rows, n_groups, gsize), bits, sym)  # [rows, n_groups]
        static = (s, z)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    Hinv, damp_used, retries = inverse_hessian_factor(H, damp, log, name)
    del H

    # Work on W^T so that a column is a contiguous row: the per-column updates stay cache-friendly.
    Wt = W.t().contiguous()
    del W
    codes = torch.zeros(cols, rows, dtype=torch.float32, device=Wt.device)
    scales = torch.zeros(n_groups, rows, dtype=torch.float32, device=Wt.device)
    zeros = torch.zeros(n_groups, rows, dtype=torch.float32, device=Wt.device)
    if static is not None:
        scales.copy_(static[0].t().expand(n_groups, rows))
        zeros.copy_(static[1].t().expand(n_groups, rows))
    # Blocks hold whole groups when the group fits, so a group's columns are all up to date.
    if grouped and not static_groups and gsize <= block_size:
        block_size = max(gsize, block_size // gsize * gsize)
    loss = torch.zeros((), device=Wt.device)
    # Static grids (one per row, or static groups): each column's (scale, zero) row is known up front.
    per_column = static_groups or not grouped
    col_group = None
    if per_column:
        order = perm if perm is not None else torch.arange(cols, device=Wt.device)
        col_group = order // gsize if grouped else torch.zeros_like(order)
    # A block's column loop has the same shape in every block when no group reaches past it: on CUDA it is
    # captured once as a CUDA graph and replayed (a column is a dozen small kernels).
    uniform = per_column or block_size % gsize == 0
    args = (bits, sym, gsize, per_column)
    graphs = _BlockGraphs(args) if cuda_graphs and Wt.is_cuda and uniform else None
    with cpu_single_thread(Wt.device):
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            W1 = Wt[i1:i2].clone()  # [count, rows]
            Hinv1 = Hinv[i1:i2, i1:i2]
            if col_group is not None:  # each column's own grid row
                grid = (scales[col_group[i1:i2]], zeros[col_group[i1:i2]])
            elif graphs is not None:  # the block's groups, indexed from the block's first
                grid = (scales[i1 // gsize : -(-i2 // gsize)], zeros[i1 // gsize : -(-i2 // gsize)])
            else:  # groups by their global index: one may run past the block
                grid = (scales, zeros)
            if graphs is not None:
                Err1 = graphs.run(W1, Hinv1, codes[i1:i2], *grid, loss)
            else:
                Err1 = _quantize_columns(W1, Hinv1, i1, codes, *grid, loss, *args, Wt)
            if i2 < cols:
                Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)
    codes = codes.t().to(torch.uint8)
    scales = scales.t()
    zeros = zeros.t()
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if grouped and not static_groups:
            g_idx = (inv // gsize).to(torch.int32)  # processing position of each natural column
    return GPTQResult(
        codes=codes.contiguous(),
        scales=scales.to(SCALE_DTYPE).contiguous(),
        zeros=None if sym else zeros.to(torch.uint8).contiguous(),
        g_idx=g_idx,
        damp=damp_used,
        retries=retries,
        loss=float(loss),
    )


def _quantize_columns(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    i1: int,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    loss: torch.Tensor,
    bits: int,
    sym: bool,
    gsize: int,
    per_column: bool,
    Wt: torch.Tensor | None = None,
) -> torch.Tensor:
    """The columns ``i1, i1 + 1, ..`` of one block ``W1 [count, rows]``: each quantized (codes into
    ``codes[i1 + i]``), its error spread over the block's later columns; returns the block's scaled errors.

    ``per_column``: ``scales[i]`` / ``zeros[i]`` hold column i's grid. Else column ``i1 + i`` belongs to group
    ``g = (i1 + i) // gsize``, whose grid is computed into ``scales[g]`` / ``zeros[g]`` at its first column
    from the error-updated weights (a group longer than the block reads its later columns from ``Wt``)."""
    Err1 = torch.zeros_like(W1)
    for i in range(W1.shape[0]):
        col = i1 + i
        w = W1[i]
        if per_column:
            scale, zero = scales[i], zeros[i]
        else:
            g = col // gsize
            if col % gsize == 0:
                span = W1[i : i + gsize]
                if span.shape[0] < gsize:  # the group runs past this block
                    assert Wt is not None
                    span = torch.cat([span, Wt[i1 + W1.shape[0] : col + gsize]], dim=0)
                scales[g], zeros[g] = grid_params(span.t(), bits, sym)
            scale, zero = scales[g], zeros[g]
        q_codes, q = grid_quantize(w, scale, zero, bits, sym)
        codes[col] = q_codes
        err = (w - q) / Hinv1[i, i]
        loss += err.dot(err) / 2
        W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
        Err1[i] = err
    return Err1


class _BlockGraphs:
    """:func:`_quantize_columns` of a block whose groups start and end inside it (or whose grids are given
    per column), as CUDA graphs (one per block length) on static copies of the block's inputs and outputs:
    the same kernels as the eager loop, so the same results, without launching a dozen small kernels per
    column from Python."""

    def __init__(self, args: tuple[int, bool, int, bool]) -> None:
        self.args = args
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def run(
        self,
        W1: torch.Tensor,
        Hinv1: torch.Tensor,
        codes1: torch.Tensor,
        scales1: torch.Tensor,
        zeros1: torch.Tensor,
        loss: torch.Tensor,
    ) -> torch.Tensor:
        """Quantize the block ``W1`` (updated in place) into ``codes1`` and its groups' ``scales1`` /
        ``zeros1`` (or, per column, read from them); add its objective to ``loss``; return the block's
        scaled errors."""
        n = W1.shape[0]
        if n not in self.graphs:
            static = tuple(t.clone() for t in (W1, Hinv1, codes1, scales1, zeros1, loss))
            side = torch.cuda.Stream(W1.device)
            side.wait_stream(torch.cuda.current_stream(W1.device))
            with torch.cuda.stream(side):  # warm-up outside capture (lazy initialization, allocator)
                scratch = [t.clone() for t in static]
                _quantize_columns(scratch[0], scratch[1], 0, *scratch[2:], *self.args)
            torch.cuda.current_stream(W1.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static[5].zero_()
                err = _quantize_columns(static[0], static[1], 0, *static[2:], *self.args)
            self.graphs[n] = (graph, static, err)
        graph, static, err = self.graphs[n]
        for buffer, value in zip(static, (W1, Hinv1, codes1, scales1, zeros1), strict=False):
            buffer.copy_(value)
        graph.replay()
        W1.copy_(static[0])
        codes1.copy_(static[2])
        if not self.args[3]:  # dynamic groups: their grids were computed (per column, they were given)
            scales1.copy_(static[3])
            zeros1.copy_(static[4])
        loss += static[5]
        return err


# --------------------------------------------------------------------------------------------------
# The Linear replacement


class GPTQLinear(RTNLinear):
    """RTN's layout filled by GPTQ; ``g_idx`` only with ``act_order`` and dynamic groups."""

    method = "gptq"

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantConfig) -> None:
        super().__init__(in_features, out_features, bias, config)
        if needs_g_idx(config, in_features):
            idx = torch.arange(in_features, dtype=torch.int32) // self.group
            self.register_buffer("g_idx", idx)
        else:
            self.g_idx = None

    def set_result(self, result: GPTQResult) -> None:
        self.qweight.copy_(pack_int4(result.codes) if self.bits == 4 else result.codes)
        self.scales.copy_(result.scales)
        if self.qzeros is not None:
            assert result.zeros is not None
            self.qzeros.copy_(result.zeros)
        if self.g_idx is not None:
            if result.g_idx is None:
                self.g_idx.copy_(torch.arange(self.in_features, device=self.g_idx.device) // self.group)
            else:
                self.g_idx.copy_(result.g_idx)

    def dequantize(self) -> torch.Tensor:
        if self.g_idx is None:
            return super().dequantize()
        codes = self.codes().to(torch.float32)
        idx = self.g_idx.long()
        scale = self.row_major("scales").float()[:, idx]
        if self.qzeros is None:
            zero = float(2 ** (self.bits - 1))
        else:
            zero = self.row_major("qzeros").float()[:, idx]
        return ((codes - zero) * scale).to(self.compute_dtype)


def needs_g_idx(config: QuantConfig, in_features: int) -> bool:
    group = config["group"]
    return bool(config["act_order"]) and not config["static_groups"] and group != -1 and group < in_features


# --------------------------------------------------------------------------------------------------
# Whole model


def input_gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` in float32 for calibration inputs ``x [tokens, in]``.

    16-bit inputs on CUDA take the tensor-core product with float32 accumulation: every product of two
    16-bit values is exact in float32, so it differs from a float32 product only in the order of the sums,
    at the 16-bit rate instead of float32's (the Hessian of a 7B's down projection is ~190 TFLOP)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(x.t(), x, out_dtype=torch.float32)
    x = x.to(torch.float32)
    return x.t() @ x


def _process_block(ctx: BlockContext, config: QuantConfig, stats: dict[str, Any]) -> dict[str, nn.Module]:
    names = list(ctx.targets)
    groups = sequential_groups(names)
    # Without true_sequential every Hessian comes from one pass over the still-float block.
    passes = groups if config["true_sequential"] else [names]
    made: dict[str, nn.Module] = {}
    for pass_names in passes:
        share = [g for g in groups if set(g) <= set(pass_names)]
        leaders = {g[0]: g for g in share}
        hessians: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def add(
            name: str,
            x: torch.Tensor,
            hessians: dict[str, torch.Tensor] = hessians,
            counts: dict[str, int] = counts,
        ) -> None:
            if name not in hessians:
                hessians[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
                counts[name] = 0
            hessians[name].add_(input_gram(x))
            counts[name] += x.shape[0]

        hooked = {n: ctx.layer.get_submodule(n) for n in leaders}
        with input_hooks(hooked, add, stop_after=set(hooked)):
            run_block(ctx.layer, ctx.inputs.hidden, ctx.kwargs, keep_outputs=False)
        for leader, members in leaders.items():
            H = hessians.pop(leader) / max(1, counts[leader])
            linears = [ctx.targets[m] for m in members]
            weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
            full = f"{ctx.prefix}.{'+'.join(m.rsplit('.', 1)[-1] for m in members)}"
            start = time.perf_counter()
            result = gptq_quantize(
                weight,
                H,
                bits=config["bits"],
                group=config["group"],
                sym=config["sym"],
                act_order=config["act_order"],
                static_groups=config["static_groups"],
                damp=config["damp"],
                block_size=config["block"],
                log=ctx.log,
                name=full,
            )
            stats["gptq_s"] += time.perf_counter() - start
            stats["retries"] += result.retries
            stats["loss"][full] = result.loss
            del H
            row = 0
            for member, lin in zip(members, linears, strict=True):
                out = lin.out_features
                part = GPTQResult(
                    codes=result.codes[row : row + out],
                    scales=result.scales[row : row + out],
                    zeros=None if result.zeros is None else result.zeros[row : row + out],
                    g_idx=result.g_idx,
                    damp=result.damp,
                    retries=result.retries,
                    loss=0.0,
                )
                row += out
                new = GPTQLinear(lin.in_features, lin.out_features, lin.bias is not None, config)
                new.to(lin.weight.device)
                new.set_result(part)
                if lin.bias is not None:
                    new.bias.copy_(lin.bias.detach().to(new.compute_dtype))
                set_submodule(ctx.layer, member, new)
                made[member] = new
    return made


def quantize_model(
    model: nn.Module, config: QuantConfig, targets: dict[str, nn.Linear], **kwargs: Any
) -> dict:
    stats: dict[str, Any] = {"gptq_s": 0.0, "retries": 0, "loss": {}}
    return calibrated_quantize(
        model,
        config,
        targets,
        lambda ctx: _process_block(ctx, config, stats),
        stats=stats,
        **kwargs,
    )


def _validate_gptq(name: str, values: dict[str, Any]) -> None:
    _validate(name, values)


GPTQ = CalibratedMethod(
    name="gptq",
    options={
        **COMMON_OPTIONS,
        "bits": Option(int, 4, choices=(2, 3, 4, 8), help="code width"),
        "group": group_option(128),
        "sym": Option(bool, True, help="symmetric (no zero point) when 1"),
        "act_order": Option(bool, False, help="quantize columns by decreasing Hessian diagonal (desc_act)"),
        "static_groups": Option(bool, False, help="group scales from the original weights (no g_idx)"),
        "true_sequential": Option(bool, True, help="q/k/v, o, gate/up, down one after another"),
        "damp": Option(
            float,
            0.01,
            check=lambda d: 0 < d < 10,
            check_text="a number in (0, 10)",
            help="damping / mean diag",
        ),
        "block": Option(int, 128, check=lambda b: b > 0, check_text="a positive integer", help="lazy batch"),
        "compute": compute_option(),
    },
    linear_cls=GPTQLinear,
    description="GPTQ (calibrated, Hessian-based error compensation), int2/3/4/8, group 128 by default",
    flags={"sym": ("sym", True), "asym": ("sym", False), "desc_act": ("act_order", True)},
    aliases={
        "group_size": "group",
        "gs": "group",
        "g": "group",
        "desc_act": "act_order",
        "damp_percent": "damp",
    },
    validate=_validate_gptq,
    bits=4,
    quantize_model=quantize_model,
)
