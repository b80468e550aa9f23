"""Programmatic dependent launch (PDL, Hopper and newer) for the decode-step kernels.

Why: a decode step is ~230 short kernels in a row. With PDL the GPU starts the next kernel's programs
while the current one drains; each kernel first requests what no earlier kernel writes (the GEMVs
their first tile of weight codes), then waits in ``griddepcontrol.wait`` until the previous kernel has
finished and its writes are visible. The tail of one kernel and the start of the next overlap, and the
small kernels (RMSNorm, attention) run while the next layer's weights are already streaming in.

Rule for every kernel launched this way: nothing the previous kernel in the stream may write is read,
and nothing is written, before :func:`wait_prior`. What kernels further back wrote is complete and
visible by then: the previous kernel lets this one start only after its own wait returned, i.e. after
the one before it finished. Weights are never written, so they may be read before the wait; decode
attention also reads the cache length, the RoPE row and the KV cache of earlier positions there (in
the decode step their writers run at least three kernels earlier).
``EngineOptions(pdl=False)`` turns PDL off for A/B runs (every launcher takes its ``launch_args``).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from quantbench.engine.kernels.routing import interpreting

__all__ = ["launch_args", "wait_prior"]


@functools.cache
def _triton_has_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda as tl_cuda
    except ImportError:  # pragma: no cover - non-NVIDIA Triton builds
        return False
    fields = {f.name for f in dataclasses.fields(CUDAOptions)}
    return "launch_pdl" in fields and hasattr(tl_cuda, "gdc_wait")


@functools.cache
def _device_has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def launch_args(device: torch.device, enabled: bool = True) -> dict:
    """Extra launch arguments of a PDL-aware kernel on ``device``: its ``PDL`` constexpr, and Triton's
    ``launch_pdl`` option where ``enabled`` (``EngineOptions.pdl``) and the GPU and Triton support it."""
    if not enabled or device.type != "cuda" or interpreting():
        return {"PDL": False}
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not (_triton_has_pdl() and _device_has_pdl(index)):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


@triton.jit
def wait_prior(PDL: tl.constexpr):
    """Wait until the previous kernel in the stream has finished (its writes visible), then let the next
    kernel's programs start: they spend their wait requesting their own weights."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
