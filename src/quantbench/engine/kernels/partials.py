"""Split-K products handed to their consumer unsummed (decode step, CUDA).

Why: a GEMV of one token splits K over 2-8 programs per row tile to fill the GPU. Summing the splits in
the GEMV takes a tail on the critical path of every product: each split stores its fp32 partial, a
fenced atomic counter elects the last one, which reloads all partials and stores the sum (three L2
round trips after the last multiply). Every product of the decode step feeds one small kernel that
reads the whole output anyway (RMSNorm's residual add, decode attention, SiLU-gate), so the GEMV just
stores its partials and that kernel sums them as it loads them: in split order, rounded once to the
model dtype, the same value the tail computed (H200, random Mistral-7B, ms per token b1 / b8 without ->
with: int4 g128 1.96 / 2.28 -> 1.90 / 2.30, NF4 2.35 / 2.86 -> 2.29 / 2.76, fp8 2.72 / 3.12 -> 2.68 / 3.04;
``benchmarks/engine_ab.py`` variant ``nopartials``, docs/bench.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["Partials", "load_summed", "parts_args"]


@dataclass
class Partials:
    """A product ``[M, N]`` kept as its split-K fp32 partial sums ``parts [S, M, N]`` (contiguous); its
    value is their sum in split order rounded to ``dtype``."""

    parts: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.parts.shape[1:]

    @property
    def device(self) -> torch.device:
        return self.parts.device

    def sum(self) -> torch.Tensor:
        """The product as a tensor of ``dtype`` (the consumers' arithmetic, in torch)."""
        total = self.parts[0].clone()
        for part in self.parts[1:]:
            total += part
        return total.to(self.dtype)


def parts_args(t: torch.Tensor | Partials) -> tuple[torch.Tensor, int, int, int]:
    """Kernel arguments of a consumer's input: ``(tensor, row stride, NPART, plane)``; NPART 0 is a plain
    2-D tensor, otherwise the number of partials ``plane`` elements apart."""
    if isinstance(t, Partials):
        s, m, n = t.parts.shape
        return t.parts, n, s, m * n
    return t, t.stride(0), 0, 0


@triton.jit
def load_summed(ptr, offs, mask, plane, NPART: tl.constexpr, DT: tl.constexpr):
    """``ptr[offs]`` for a plain input (NPART 0); else the sum of the NPART partials in split order,
    rounded to ``DT``."""
    if NPART == 0:
        return tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        total = tl.load(ptr + offs, mask=mask, other=0.0)
        for s in tl.static_range(1, NPART):
            total += tl.load(ptr + s * plane + offs, mask=mask, other=0.0)
        return total.to(DT)
