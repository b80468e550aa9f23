"""Where a prompt pass and a decode step spend their time: the top kernels of each, per method.

    python benchmarks/decode_profile.py --methods "int4:group=128;llm.int8:compute=bf16" --json prof.json

Each method quantizes a fresh random-weight model and times CUDA-graph generation (``--input`` prompt +
64 new tokens, median of 3: first token and per token) with programmatic dependent launch (PDL) on and
off. It then profiles, with PDL off (with it on, a kernel's time would include its wait for the one
before), two eager generations: one new token (the prompt pass) and ``1 + --steps`` new tokens. Kernels
of the prompt pass are the first profile's; those of one decode step are the difference of the two,
divided by ``--steps``; the tensor-core GEMV calls are also listed per product (qkv, o, gate/up, down).
Kernel times are device time; the graph timings include the gaps between kernels. The captured prompt
pass is profiled too (``graph_prompt_pdl`` / ``_nopdl``): with PDL on, a kernel's time there includes
its early start (waiting for the one before), so the sum can exceed the pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter

import torch

import quantbench
from quantbench.bench.runner import split_methods
from quantbench.engine import Engine, EngineOptions

GEMVS = ("qkv", "o", "gate_up", "down")  # a layer's products in the order the decode step runs them


def kernel_totals(engine: Engine, ids: torch.Tensor, new_tokens: int, by_layer: dict | None = None) -> tuple:
    """Device microseconds and calls per kernel name over one eager ``generate``; with ``by_layer``,
    also each tensor-core GEMV call's microseconds under its product's name (``GEMVS`` in turn)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.generate(ids, max_new_tokens=new_tokens, ignore_eos=True)
    if by_layer is not None:
        gemvs = sorted(
            (ev.time_range.start, ev.time_range.elapsed_us())
            for ev in prof.events()
            if ev.device_type == torch.autograd.DeviceType.CUDA and ev.name == "_mma_gemv_kernel"
        )
        for i, (_, us) in enumerate(gemvs):
            by_layer.setdefault(GEMVS[i % 4], []).append(us)
    us, calls = Counter(), Counter()
    for ev in prof.key_averages():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.count:
            us[ev.key[:80]] += ev.device_time_total
            calls[ev.key[:80]] += ev.count
    return us, calls


def table(us: Counter, calls: Counter, per: float, top: int) -> list[dict]:
    rows = [
        {
            "name": name,
            "us": round(t / per, 1),
            "calls": round(calls[name] / per, 1),
            "mean_us": round(t / max(calls[name], 1), 2),
        }
        for name, t in us.items()
        if t / per >= 0.05
    ]
    rows.sort(key=lambda r: -r["us"])
    return rows[:top]


def profile_method(args, method: str) -> dict:
    torch.manual_seed(0)
    model = quantbench.random_model(args.arch, dtype="bf16", device="cuda")
    quantbench.quantize(model, method)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.input), device="cuda")
    first, per_token, graph_prompt = {}, {}, {}
    no_pdl = EngineOptions(pdl=False)
    for pdl_off in (False, True):  # CUDA graphs, PDL on (the default) and off
        engine = Engine(model, cuda_graphs=True, options=no_pdl if pdl_off else EngineOptions())
        firsts, steps = [], []
        for _ in range(4):  # the first run captures the graphs
            engine.generate(ids, max_new_tokens=64, ignore_eos=True)
            firsts.append(engine.timing.first_token_ms)
            steps.append(engine.timing.per_token_ms)
        key = "nopdl" if pdl_off else "pdl"
        first[key] = round(statistics.median(firsts[1:]), 3)
        per_token[key] = round(statistics.median(steps[1:]), 4)
        graph_prompt[key] = kernel_totals(engine, ids, 1)  # the captured prompt pass, kernel by kernel
        del engine
    eager = Engine(model, cuda_graphs=False, options=no_pdl)
    eager.generate(ids, max_new_tokens=args.steps + 1, ignore_eos=True)  # compile every kernel
    prompt_us, prompt_calls = kernel_totals(eager, ids, 1)
    by_layer: dict[str, list[float]] = {}
    all_us, all_calls = kernel_totals(eager, ids, args.steps + 1, by_layer)
    step_us, step_calls = all_us - prompt_us, all_calls - prompt_calls
    del eager, model
    torch.cuda.empty_cache()
    return {
        "method": method,
        "first_token_ms": first,
        "per_token_ms": per_token,
        "prompt_kernel_ms": round(sum(prompt_us.values()) / 1e3, 3),
        "step_kernel_ms": round(sum(step_us.values()) / 1e3 / args.steps, 4),
        **{
            f"graph_prompt_{k}_kernel_ms": round(sum(v[0].values()) / 1e3, 3) for k, v in graph_prompt.items()
        },
        **{f"graph_prompt_{k}": table(*v, 1, args.top) for k, v in graph_prompt.items()},
        "prompt": table(prompt_us, prompt_calls, 1, args.top),
        "step": table(step_us, step_calls, args.steps, args.top),
        "step_gemv_us": {k: round(statistics.median(v), 2) for k, v in by_layer.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="mistral-7b")
    ap.add_argument("--methods", default="int4:group=128")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--input", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for method in split_methods([args.methods]):
        row = profile_method(args, method)
        rows.append(row)
        print(f"\n{method}: first token {row['first_token_ms']} ms, {row['per_token_ms']} ms/token (graphs)")
        for part in ("prompt", "step", "graph_prompt_pdl", "graph_prompt_nopdl"):
            print(f"  {part}: kernels {row[part + '_kernel_ms']} ms")
            if part == "step":
                print(f"    tensor-core GEMV, median us per call: {row['step_gemv_us']}")
            for k in row[part]:
                print(
                    f"    {k['us']:8.1f} us  {k['calls']:6.1f} calls  {k['mean_us']:7.2f} us/call  {k['name']}"
                )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"arch": args.arch, "batch": args.batch, "input": args.input, "rows": rows}, fh, indent=1
            )


if __name__ == "__main__":
    main()
