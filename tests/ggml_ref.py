"""llama.cpp's own quantizers through ctypes, as the bit-exactness reference for quant/ggml_*.py.

The library is ggml-base from an installed llama-cpp-python (its ``llama_cpp/lib`` folder), or the
file named by ``$QUANTBENCH_GGML_LIB``. ``ggml_quantize_chunk`` with a NULL importance matrix runs
the ``quantize_row_*_ref`` functions, which is what ``llama-quantize`` does without ``--imatrix``.

    ref = load_ggml()                     # None when no library is found
    if ref is None: pytest.skip(GGML_MISSING)
    blocks = ref.quantize(GGMLQuantizationType.Q4_K, weight)   # uint8 [rows, row_bytes]
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

GGML_MISSING = (
    "llama.cpp's ggml library not found: install llama-cpp-python (built from source) "
    "or set QUANTBENCH_GGML_LIB to a libggml-base.so"
)
_LIB_NAMES = ("libggml-base.so", "libggml.so", "libllama.so", "libggml-base.dylib", "libggml.dylib")


def _candidates() -> list[Path]:
    found: list[Path] = []
    env = os.environ.get("QUANTBENCH_GGML_LIB")
    if env:
        found.append(Path(env))
    spec = importlib.util.find_spec("llama_cpp")
    if spec is not None and spec.submodule_search_locations:
        pkg = Path(next(iter(spec.submodule_search_locations)))
        for folder in (pkg / "lib", pkg / "lib64", pkg):
            found.extend(folder / name for name in _LIB_NAMES)
    return [path for path in found if path.is_file()]


class GGMLRef:
    """A loaded ggml library; quantize / dequantize rows the way llama.cpp does."""

    def __init__(self, path: Path):
        # RTLD_GLOBAL lets libggml-base resolve symbols its siblings (libggml-cpu) export, if asked.
        self.path = path
        self.lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        fn = self.lib.ggml_quantize_chunk
        fn.restype = ctypes.c_size_t
        fn.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        self._quantize_chunk = fn

    def quantize(self, qtype: GGMLQuantizationType, weight: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``weight [rows, n_per_row]`` -> uint8 ``[rows, row_bytes]`` from ``ggml_quantize_chunk``."""
        src = np.ascontiguousarray(
            weight.detach().cpu().float().numpy() if isinstance(weight, torch.Tensor) else weight,
            dtype=np.float32,
        )
        rows, n_per_row = src.shape
        block, type_size = GGML_QUANT_SIZES[qtype]
        if n_per_row % block:
            raise ValueError(f"{qtype.name}: row length {n_per_row} is not a multiple of {block}")
        row_bytes = n_per_row // block * type_size
        dst = np.zeros((rows, row_bytes), dtype=np.uint8)
        written = self._quantize_chunk(int(qtype), src.ctypes.data, dst.ctypes.data, 0, rows, n_per_row, None)
        if written != rows * row_bytes:
            raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {rows * row_bytes}")
        return torch.from_numpy(dst)


@lru_cache(maxsize=1)
def load_ggml() -> GGMLRef | None:
    """The first loadable ggml library among the candidates, or None."""
    for path in _candidates():
        try:
            return GGMLRef(path)
        except (OSError, AttributeError):
            continue
    return None
