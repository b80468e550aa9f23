"""``quantbench run`` as a sweep: the named presets (``run --preset NAME``) and the sweep config built from
``run``'s flags, executed by :func:`quantbench.report.sweep.run_sweep` like a ``sweep.yaml``.

A preset is data: methods x tasks x subjects. ``examples/<name>.yaml`` is the same sweep as a
file (a test checks that both expand to the same units and keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantbench.errors import QuantbenchError
from quantbench.report.sweep import EvalSettings, SweepConfig


class PresetError(QuantbenchError):
    """An unknown preset, or a preset combined with flags that replace it."""


@dataclass(frozen=True)
class RunPreset:
    """What a preset fixes: methods, tasks and which subjects. Everything else comes from ``run``'s flags
    (model, --limit, --subjects, --shots 5, --split val, --mode loglikelihood, --device, --calib...)."""

    description: str
    methods: tuple[str, ...]
    tasks: tuple[str, ...]
    subjects: str = "all"  # all (every subject of every task) | quick (run's quick subset)


# The seed table: the nine bitsandbytes / AutoAWQ / AutoGPTQ configurations on 5-shot MMLU and C-Eval.
# "fp4 fp32" is the one row whose double quant the seed does not state: it runs without (dq=0).
PRESETS: dict[str, RunPreset] = {
    "seed": RunPreset(
        description="the seed table: BF16, LLM.int8, FP4/NF4 variants, AWQ g128, GPTQ g128 on MMLU + C-Eval",
        methods=(
            "bf16",
            "llm.int8:threshold=6.0",
            "fp4:compute=fp16,block=64,dq=0",
            "fp4:compute=fp16,block=64,dq=1",
            "fp4:compute=fp32,block=64,dq=0",
            "nf4:compute=fp16,block=64",
            "nf4:compute=fp16,block=128",
            "awq:bits=4,group=128",
            "gptq:bits=4,group=128",
        ),
        tasks=("mmlu", "ceval"),
    ),
}


def get_preset(name: str) -> RunPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise PresetError(f"unknown preset '{name}'; presets: {', '.join(PRESETS)}") from None


def run_sweep_config(
    *,
    name: str,
    model: str,
    methods: list[str],
    tasks: list[str],
    subjects: Any,
    limit: int | None,
    shots: int,
    split: str,
    mode: str,
    protocol: str,
    batch_size: int,
    device: str | None,
    calib: str | None,
    dequant_cache: bool | None,
) -> SweepConfig:
    """The sweep ``quantbench run`` executes: one eval stage per task, no perplexity or bench stage.

    ``methods`` are canonical specs (empty for a checkpoint: its own); ``subjects`` is what a sweep file's
    ``eval.subjects`` takes (``quick``, ``all``, a list or ``{task: [subjects]}``).
    """
    return SweepConfig(
        name=name,
        model=model,
        methods=list(methods),
        device=device or "auto",
        calib=calib,
        dequant_cache=dequant_cache,
        eval=EvalSettings(
            tasks=list(tasks),
            subjects=subjects,
            limit=limit,
            shots=shots,
            split=split,
            mode=mode,
            protocol=protocol,
            batch_size=batch_size,
        ),
    )
