"""CPU speed of ``compute=fp16``: the emulated fp16 linear (quant/compute.py) against torch's own fp16 kernel.

    python benchmarks/fp16_compute_cpu.py [--model qwen2.5-coder-0.5b] [--methods nf4,fp4,int8]
        [--batch 2] [--tokens 256] [--repeats 3] [--threads 1] [--rows] [--profile SPEC] [--json out.json]

For each method the real model is quantized with ``compute=fp32``, ``fp16`` and ``bf16`` (dequantized
weights cached, as the CPU evaluation does) and one forward of ``batch x tokens`` random tokens is
timed with ``logits_to_keep=1`` (what the 5-shot MMLU / C-Eval loglikelihood path computes). The fp16
model runs twice: with the emulated kernel and with torch's. The variants of a method are interleaved
within each repeat so that load from other processes hits them alike; the table shows medians.

``--rows`` adds a sweep over the number of rows (tokens) of one 4864x896 fp16 linear: where torch's
fp16 GEMV stops being the faster one (``compute.EMULATE_MIN_ROWS``). ``--profile SPEC`` prints the
torch.profiler table (self CPU time by op and shape) of one forward of a model quantized with SPEC.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import quantbench
from quantbench.quant.apply import set_cpu_fp16_kernel, set_dequant_cache
from quantbench.quant.compute import linear_fp16_emulated


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _quantized(base: torch.nn.Module, spec: str) -> torch.nn.Module:
    model = quantbench.quantize(copy.deepcopy(base), spec)
    set_dequant_cache(model, True)
    return model.eval()


def model_rows(
    base: torch.nn.Module, methods: list[str], ids: torch.Tensor, repeats: int, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Median seconds per forward for each (method, compute, kernel)."""
    rows: list[dict[str, Any]] = []
    for method in methods:
        variants: list[tuple[str, str, torch.nn.Module]] = []
        for compute in ("fp32", "fp16", "bf16"):
            model = _quantized(base, f"{method}:compute={compute}")
            kernels = ("emulated", "torch") if compute == "fp16" else ("-",)
            variants += [(compute, kernel, model) for kernel in kernels]
        times: dict[tuple[str, str], list[float]] = {(c, k): [] for c, k, _ in variants}
        with torch.no_grad():
            for model in {id(m): m for _, _, m in variants}.values():
                model(ids[:, :8], logits_to_keep=1)  # fill the dequantized-weight cache
            for rep in range(repeats):
                for compute, kernel, model in variants:
                    if kernel != "-":
                        set_cpu_fp16_kernel(model, kernel)
                    times[compute, kernel].append(_timed(lambda m=model: m(ids, logits_to_keep=1)))
                log(
                    f"  {method} repeat {rep + 1}/{repeats}: "
                    + ", ".join(f"{t[-1]:.1f}" for t in times.values())
                )
        fp32 = statistics.median(times["fp32", "-"])
        for (compute, kernel), ts in times.items():
            med = statistics.median(ts)
            rows.append(
                {
                    "method": method,
                    "compute": compute,
                    "kernel": kernel,
                    "s_per_forward": med,
                    "vs_fp32": med / fp32,
                    "all_s": ts,
                }
            )
        del variants
    return rows


def head_rows(base: torch.nn.Module, ids: torch.Tensor, repeats: int) -> list[dict[str, Any]]:
    """The unquantized lm_head over every position (a full-logits forward, e.g. perplexity): it stays
    an ``nn.Linear`` in the compute dtype and runs in torch's own kernel."""
    head = base.get_output_embeddings().weight.detach()
    hidden = torch.randn(*ids.shape, head.shape[1])
    cases = {
        "fp32": lambda: F.linear(hidden, head),
        "fp16 torch": lambda: F.linear(hidden.half(), head.half()),
        "fp16 emulated": lambda: linear_fp16_emulated(hidden, head.half()),
        "bf16": lambda: F.linear(hidden.bfloat16(), head.bfloat16()),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(_timed(fn))
    return [{"case": k, "s": statistics.median(v), "all_s": v} for k, v in times.items()]


def rows_sweep(repeats: int) -> list[dict[str, Any]]:
    """One 4864x896 fp16 linear (Qwen2.5-0.5B's gate/up) against the number of rows."""
    torch.manual_seed(0)
    w = (torch.randn(4864, 896) * 0.02).half()
    w32 = w.float()
    out = []
    for m in (1, 2, 4, 8, 16, 32, 64, 256):
        x = torch.randn(m, 896).half()
        cases = {
            "fp16 torch": lambda x=x: F.linear(x, w),
            "fp16 emulated": lambda x=x: linear_fp16_emulated(x, w),
            "fp32": lambda x=x: F.linear(x.float(), w32),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(max(repeats, 7)):
            for name, fn in cases.items():
                times[name].append(_timed(fn))
        out.append({"rows": m, **{k: statistics.median(v) * 1e3 for k, v in times.items()}})
    return out


def profile(base: torch.nn.Module, spec: str, ids: torch.Tensor) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = _quantized(base, spec)
    with torch.no_grad():
        model(ids[:, :8])
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(ids)
    return prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--methods", default="nf4,fp4,int8")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", action="store_true", help="also sweep the row count of one linear")
    parser.add_argument("--profile", default=None, metavar="SPEC", help="profile one full-logits forward")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    base, _ = quantbench.load_model(args.model, dtype="fp32")
    torch.manual_seed(0)
    ids = torch.randint(0, 30000, (args.batch, args.tokens))
    result: dict[str, Any] = {
        "model": args.model,
        "batch": args.batch,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if args.profile:
        print(profile(base, args.profile, ids))
    print(f"{args.model}, {args.batch} x {args.tokens} tokens, logits_to_keep=1, {args.threads} thread(s)")
    rows = model_rows(base, args.methods.split(","), ids, args.repeats, print)
    result["forward"] = rows
    print(f"\n{'method':8} {'compute':8} {'kernel':9} {'s/forward':>10} {'vs fp32':>8}")
    for r in rows:
        print(
            f"{r['method']:8} {r['compute']:8} {r['kernel']:9} {r['s_per_forward']:10.2f} {r['vs_fp32']:8.2f}"
        )
    heads = head_rows(base, ids, args.repeats)
    result["lm_head_all_positions"] = heads
    print(f"\nlm_head over all {args.batch * args.tokens} positions (full logits):")
    for h in heads:
        print(f"  {h['case']:14} {h['s']:7.2f} s")
    if args.rows:
        sweep = rows_sweep(args.repeats)
        result["rows_sweep_ms"] = sweep
        print("\none 4864x896 linear, ms by rows:  " + "  ".join(k for k in sweep[0] if k != "rows"))
        for s in sweep:
            print(f"  {s['rows']:4d}  " + "  ".join(f"{v:10.2f}" for k, v in s.items() if k != "rows"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
