"""Peak memory of the current process: CPU resident-set high-water mark, or CUDA max allocated bytes."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def reset_peak(device: str | torch.device = "cpu") -> None:
    """Start a new peak measurement (CPU: writes 5 to /proc/self/clear_refs, which resets VmHWM)."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then covers the whole process lifetime


def peak_bytes(device: str | torch.device = "cpu") -> tuple[int, str]:
    """(bytes, kind): ``cuda-max-allocated`` or ``cpu-rss-hwm`` since the last :func:`reset_peak`."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device)), "cuda-max-allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "cpu-rss-hwm"
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu-rss-hwm"
