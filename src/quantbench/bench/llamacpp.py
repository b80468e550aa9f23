"""llama.cpp beside quantbench in ``bench --llama-cpp``: the same GGUF bytes, timed in llama.cpp's CPU engine.

The model quantbench just benchmarked is written with :func:`quantbench.gguf_export.export_gguf` (a
llama.cpp-format method keeps its block bytes; a 16-bit model is written as F16/BF16) and loaded with
llama-cpp-python (an optional peer: ``pip install llama-cpp-python`` builds llama.cpp from source). The
prompt is the same token ids; llama.cpp evaluates it in one batch (first token) and then decodes one
token at a time (per token), greedy, on the same number of threads. Batch 1 only: llama-cpp-python's
``Llama`` runs one sequence.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantbench.errors import QuantbenchError


class LlamaCppUnavailable(QuantbenchError):
    """llama-cpp-python is not installed (or cannot load the file)."""


def llama_cpp_version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return str(getattr(llama_cpp, "__version__", "?"))


def time_llama_cpp(
    gguf_path: str | Path,
    prompt_ids: list[int],
    output_len: int,
    repeats: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """First-token and per-token time (ms, medians of ``repeats``) of llama.cpp on ``gguf_path``.

    Each repeat starts from an empty KV cache: the prompt is evaluated in one batch, its last logits
    give the first token, then ``output_len - 1`` single-token decode steps follow.
    """
    try:
        import llama_cpp
        from llama_cpp import Llama
    except ImportError:
        raise LlamaCppUnavailable(
            "--llama-cpp needs llama-cpp-python (pip install llama-cpp-python; it builds llama.cpp from source)"
        ) from None
    threads = threads or torch.get_num_threads()
    n_ctx = len(prompt_ids) + output_len + 8
    try:
        llm = Llama(
            model_path=str(gguf_path),
            n_ctx=n_ctx,
            n_batch=max(len(prompt_ids), 8),
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        raise LlamaCppUnavailable(f"llama.cpp could not load {gguf_path}: {exc}") from None
    n_vocab = llm.n_vocab()

    def greedy() -> int:  # the last position's logits, read from llama.cpp's context directly
        logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())

    firsts, steps = [], []
    for _ in range(repeats + 1):  # the first run warms caches and is not counted
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        token = greedy()
        first_ms = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        for _ in range(output_len - 1):
            llm.eval([token])
            token = greedy()
        step_ms = (time.perf_counter() - t1) * 1e3 / max(output_len - 1, 1)
        firsts.append(first_ms)
        steps.append(step_ms)
    firsts, steps = firsts[1:], steps[1:]
    return {
        "first_token_ms": statistics.median(firsts),
        "per_token_ms": statistics.median(steps) if output_len > 1 else float("nan"),
        "first_token_all_ms": [round(v, 3) for v in firsts],
        "per_token_all_ms": [round(v, 4) for v in steps],
        "threads": threads,
        "llama_cpp_version": llama_cpp_version(),
    }


def bench_llama_cpp(
    model: nn.Module, prompt_ids: list[int], output_len: int, repeats: int = 3, threads: int | None = None
) -> dict[str, Any]:
    """Export ``model`` to a temporary GGUF file and time llama.cpp on it (see :func:`time_llama_cpp`)."""
    from quantbench.gguf_export import export_gguf

    with tempfile.TemporaryDirectory(prefix="quantbench-llamacpp-") as work:
        path = export_gguf(model, Path(work) / "model.gguf")
        result = time_llama_cpp(path, prompt_ids, output_len, repeats=repeats, threads=threads)
        result["gguf_bytes"] = path.stat().st_size
    return result
