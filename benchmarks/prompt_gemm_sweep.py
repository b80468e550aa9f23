"""Prompt-sized quantized products on the Mistral-7B layer shapes (needs a CUDA GPU): the fused
dequantize-GEMM (``kernels/prompt_gemm.py``) at several launch configurations, against dequantized L2
slabs + cuBLAS and against bf16 cuBLAS on weights of the same shape.

    python benchmarks/prompt_gemm_sweep.py --methods "int4:group=128;nf4:block=64" --m 128 --json out.json

Each shape is timed on ``--copies`` distinct weights called in turn inside one CUDA graph (median of 5
replays, after a spin that raises the clocks), so codes come from HBM as they do in a prompt pass.
The "layer ms" column is the four products of one decoder layer summed, times 32 layers: the linear
part of one prompt pass. Every configuration is checked against the slab path (relative error).
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

import quantbench
from quantbench.bench.runner import device_name, split_methods
from quantbench.engine.kernels import dequant, layout_for
from quantbench.engine.kernels.fused import act_quant
from quantbench.engine.kernels.layouts import ACT_NONE, tiling_for
from quantbench.engine.kernels.prompt_gemm import prompt_config, prompt_gemm

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LAYERS = 32


def timed(calls: list) -> float:
    """ms per call of ``calls`` (distinct weights, so the codes come from HBM as in a prompt pass), replayed
    as one CUDA graph after a spin that brings the clocks up; median of 5 replays."""
    for call in calls:  # compiles, allocates the split-K workspace / slab buffers outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    spin = torch.randn(4096, 4096, device="cuda")
    for _ in range(200):
        spin @ spin
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    del graph
    return sorted(times)[2]


def _call(x, lay, rf, cfg):
    return lambda: prompt_gemm(x, lay, row_factor=rf, config=dict(cfg))


def parse_configs(text: str) -> list[tuple[str, dict]]:
    """``auto;BN=64;num_stages=4,num_warps=4;split=2`` -> overrides of ``prompt_config`` (split multiplies)."""
    out = []
    for item in [t for t in text.split(";") if t]:
        over = {}
        if item != "auto":
            for kv in item.split(","):
                key, value = kv.split("=")
                over[key] = float(value) if key == "split" else int(value)
        out.append((item, over))
    return out


def layer(spec: str, n: int, k: int):
    lin = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16))
    with torch.no_grad():
        lin[0].weight.normal_(0, 0.02)
    quantbench.quantize(lin, spec)
    module = lin[0]
    tiles = tiling_for(module)  # the engine's storage
    if tiles:
        module.store_tiled(tiles)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="int4:group=128;nf4:block=64;int8;fp8;llm.int8:compute=bf16")
    ap.add_argument("--m", type=int, default=128, help="tokens (rows of x)")
    ap.add_argument("--configs", default="auto;BN=64;num_stages=2;num_stages=4;num_warps=4;split=2;split=0.5")
    ap.add_argument("--copies", type=int, default=4, help="distinct weights per shape, called in turn")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    configs = parse_configs(args.configs)
    rows = []
    gpu = device_name(torch.device("cuda"))
    totals: dict[tuple[str, str], float] = {}
    for name, (n, k) in SHAPES.items():
        x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(args.copies)]
        ms = timed([functools.partial(torch.mm, x, w.t()) for w in ws])
        totals["bf16", "cuBLAS"] = totals.get(("bf16", "cuBLAS"), 0.0) + ms
        rows.append({"method": "bf16", "shape": name, "path": "cuBLAS", "ms": ms})
        print(f"{'bf16':24s} {name:8s} {'cuBLAS':28s} {ms * 1e3:8.1f} us", flush=True)
        del ws
    for spec in split_methods([args.methods]):
        for name, (n, k) in SHAPES.items():
            lays = [layout_for(layer(spec, n, k)) for _ in range(args.copies)]
            lay = lays[0]
            x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
            rf = None
            if lay.act_quant != ACT_NONE:
                x, rf = act_quant(x, lay.act_quant, lay.threshold, False, k)
            ref = dequant.dense_matmul(x, lay, row_factor=rf)
            ms = timed([functools.partial(dequant.dense_matmul, x, la, row_factor=rf) for la in lays])
            rows.append({"method": spec, "shape": name, "path": "slab", "ms": ms})
            totals[spec, "slab"] = totals.get((spec, "slab"), 0.0) + ms
            print(f"{spec:24s} {name:8s} {'slab':28s} {ms * 1e3:8.1f} us", flush=True)
            base = prompt_config(args.m, n, k, lay.bits, lay.mode, lay.group)
            for label, over in configs:
                cfg = {**base, **{key: v for key, v in over.items() if key != "split"}}
                if "split" in over:
                    cfg["SPLIT_K"] = max(1, int(cfg["SPLIT_K"] * over["split"]))
                try:
                    out = prompt_gemm(x, lay, row_factor=rf, config=dict(cfg))
                    err = float((out.double() - ref.double()).norm() / ref.double().norm())
                    ms = timed([_call(x, la, rf, cfg) for la in lays])
                except Exception as exc:  # a configuration that does not compile (shared memory, registers)
                    print(f"{spec} {name} {label}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    ms, err = float("nan"), float("nan")
                rows.append(
                    {"method": spec, "shape": name, "path": label, "config": cfg, "ms": ms, "rel_err": err}
                )
                totals[spec, label] = totals.get((spec, label), 0.0) + ms
                print(
                    f"{spec:24s} {name:8s} {label:28s} {ms * 1e3:8.1f} us  err {err:.1e}  {cfg}", flush=True
                )
            del lays, lay
    print(f"\nlinears of one prompt pass ({LAYERS} layers, M = {args.m}) on {gpu}:")
    for (spec, label), ms in totals.items():
        print(f"{spec:24s} {label:28s} {ms * LAYERS:7.2f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": gpu, "m": args.m, "rows": rows,
                       "layer_ms": {f"{s}|{lab}": v * LAYERS for (s, lab), v in totals.items()}}, fh, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
