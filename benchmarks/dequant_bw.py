"""Dequantizing a whole weight for an eager slab product (evaluation's forwards): time and bandwidth per
method and product.

    python benchmarks/dequant_bw.py --json dequant.json

An evaluation batch multiplies each quantized product on a dequantized 16-bit copy of its whole weight
(``dequant.dense_matmul``): every forward writes every weight once more. Shapes: Qwen2.5-7B's four
products as the engine fuses them (q/k/v, o, gate/up, down), codes stored as the engine stores them
(tile-major for the batch-1 GEMV where it tiles them). Bytes per call: codes and scales read, the bf16
weight written; the percentage is of the device's copy bandwidth. Timing: ``kernel_bw.bench`` (CUDA-graph
replays, L2 flushed before each, median). The last table sums a layer's four products and multiplies by
the 28 layers of one forward.
"""

from __future__ import annotations

import argparse
import json

import torch

from quantbench.bench.runner import device_name, measure_copy_bandwidth
from quantbench.engine.kernels.dequant import dequantize_rows
from quantbench.engine.kernels.layouts import layout_for

LAYERS = 28


def main() -> None:
    from kernel_bw import bench
    from w8a8_gemm_sweep import SHAPES, layer  # Qwen2.5-7B's products, stored as the engine stores them

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="llm.int8;int8;fp8;smoothquant;int4:group=128;nf4:block=64")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        raise SystemExit(f"dequant_bw: unknown shape(s) {', '.join(unknown)} (known: {', '.join(SHAPES)})")
    shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    dev = torch.device("cuda")
    copy_gbps = measure_copy_bandwidth(dev)
    print(f"device {device_name(dev)}, copy {copy_gbps:.0f} GB/s")
    print(f"{'method':18s} {'product':8s} {'us':>8} {'GB/s':>7} {'% copy':>7}")
    rows, layer_us = [], {}
    for spec in (s.strip() for s in args.methods.split(";") if s.strip()):
        modules = layer(spec)
        for name, (k, n) in shapes.items():
            layout = layout_for(modules[name])
            out = torch.empty((n, k), device="cuda", dtype=torch.bfloat16)
            ms = bench(lambda layout=layout, n=n, out=out: dequantize_rows(layout, 0, n, out))
            gbps = (layout.weight_bytes + 2 * n * k) / ms / 1e6
            rows.append({"method": spec, "product": name, "n": n, "k": k, "tiled_codes": bool(layout.tile_n),
                         "us": ms * 1e3, "gbps": gbps, "pct_copy": 100 * gbps / copy_gbps})  # fmt: skip
            layer_us[spec] = layer_us.get(spec, 0.0) + ms * 1e3
            print(f"{spec:18s} {name:8s} {ms * 1e3:8.1f} {gbps:7.0f} {100 * gbps / copy_gbps:6.1f}%", flush=True)
            del layout, out
        del modules
        torch.cuda.empty_cache()
    if len(shapes) == len(SHAPES):
        print(f"\n{'method':18s} {'layer us':>9} {'forward ms':>11}")
        for spec, us in layer_us.items():
            print(f"{spec:18s} {us:9.1f} {us * LAYERS / 1e3:11.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device_name(dev), "copy_gbps": copy_gbps, "rows": rows,
                       "layer_us": layer_us if len(shapes) == len(SHAPES) else None}, fh, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
