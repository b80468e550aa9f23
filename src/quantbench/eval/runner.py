"""What ``quantbench run`` compares: the default methods, the quick subset, and one method's record.

``run`` executes as a sweep (:func:`quantbench.report.sweep.run_sweep`): for each method it loads and
quantizes through :func:`quantbench.loader.load`, evaluates every task (answers go to the store per batch,
so a rerun skips what is done), records a run row and a :class:`MethodRun`, and frees the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quantbench.eval.harness import TaskResult

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
QUICK_LIMIT = 20


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
    calibration: dict[str, Any] | None = None  # calibrated methods: the data they were calibrated on

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
            "calibration": self.calibration,
            "tasks": {r.task: r.to_dict() for r in self.results},
        }
