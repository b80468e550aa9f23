"""Per-token decode time and the top kernels of one decode pass, row-major vs tile-major weights.

    python benchmarks/decode_profile.py --method int4:group=128 --variants row,tiled,tiled-lowsplit

Each variant quantizes a fresh random-weight model (the engine tiles weights in place), times CUDA-graph
decoding (128 prompt + 64 new tokens, median of 3) and profiles one eager generation of 9 tokens (the
prompt pass and 8 decode steps; kernel names, calls, mean microseconds; "us/step" divides totals by 8). ``tiled-lowsplit`` / ``tiled-w2`` override the tiled GEMV's K-split / warps to the
row-major choices, to separate the layout from the launch configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

import quantbench
from quantbench.engine import Engine
from quantbench.engine.kernels import gemv_h2
from quantbench.engine.kernels import layouts as lay


def _patched_config(variant: str):
    original = gemv_h2._config

    def config(n, k, layout, device):
        cfg = original(n, k, layout, device)
        if layout.tile_n and variant in ("tiled-lowsplit", "tiled-w2"):
            cfg["num_warps"] = 2
            if variant == "tiled-lowsplit":
                cfg["SPLIT_K"] = max(1, cfg["SPLIT_K"] // 2)
        return cfg

    return original, config


def run_variant(args, variant: str) -> dict:
    os.environ.pop("QUANTBENCH_NO_TILE", None)
    if variant == "row":
        os.environ["QUANTBENCH_NO_TILE"] = "1"
    original, config = _patched_config(variant)
    gemv_h2._config = config
    torch.manual_seed(0)
    model = quantbench.random_model(args.arch, dtype="bf16", device="cuda")
    quantbench.quantize(model, args.method)
    engine_tile = lay.gemv_tile
    if variant != "row":  # the engine keeps some formats row-major: force 128 x 16-word tiles for them
        lay.gemv_tile = lambda layout: engine_tile(layout) or (128, 16)
    ids = torch.randint(0, model.config.vocab_size, (1, 128), device="cuda")
    engine = Engine(model, cuda_graphs=True)
    per_token = []
    for _ in range(4):
        engine.generate(ids, max_new_tokens=64, ignore_eos=True)
        per_token.append(engine.timing.per_token_ms)
    eager = Engine(model, cuda_graphs=False)
    eager.generate(ids, max_new_tokens=4, ignore_eos=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        eager.generate(ids, max_new_tokens=9, ignore_eos=True)
    kernels = []
    for ev in prof.key_averages():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.count:
            total = ev.device_time_total
            kernels.append({"name": ev.key[:90], "calls": ev.count, "mean_us": round(total / ev.count, 2),
                            "total_us": round(total, 1)})  # fmt: skip
    kernels.sort(key=lambda r: -r["total_us"])
    gemv_h2._config = original
    lay.gemv_tile = engine_tile
    os.environ.pop("QUANTBENCH_NO_TILE", None)
    del engine, eager, model
    torch.cuda.empty_cache()
    return {"variant": variant, "per_token_ms": round(statistics.median(per_token[1:]), 4),
            "all_ms": [round(v, 4) for v in per_token[1:]], "kernels": kernels[:10]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="mistral-7b")
    ap.add_argument("--method", default="int4:group=128")
    ap.add_argument("--variants", default="row,tiled,tiled-w2,tiled-lowsplit")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for variant in args.variants.split(","):
        row = run_variant(args, variant)
        rows.append(row)
        print(f"{args.method} {variant:15s} {row['per_token_ms']:.3f} ms/token {row['all_ms']}", flush=True)
        for kern in row["kernels"]:
            print(
                f"    {kern['total_us'] / 8:8.1f} us/step  {kern['calls']:5d} calls  {kern['mean_us']:7.2f} us  {kern['name']}"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"method": args.method, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
