"""Prompt-sized quantized products on the Mistral-7B layer shapes (needs a CUDA GPU): the fused
dequantize-GEMM (``kernels/prompt_gemm.py``) at several launch configurations, against dequantized L2
slabs + cuBLAS and against bf16 cuBLAS on weights of the same shape.

    python benchmarks/prompt_gemm_sweep.py --methods "int4:group=128;nf4:block=64" --m 128 --json out.json

Each product is timed with ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, median).
The "layer ms" column is the four products of one decoder layer summed, times 32 layers: the linear
part of one prompt pass. Every configuration is checked against the slab path (relative error).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

import quantbench
from quantbench.bench.runner import device_name, split_methods
from quantbench.engine.kernels import dequant, layout_for
from quantbench.engine.kernels.fused import act_quant
from quantbench.engine.kernels.layouts import ACT_NONE, tiling_for
from quantbench.engine.kernels.prompt_gemm import prompt_config, prompt_gemm

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LAYERS = 32


def timed(fn, *args, **kwargs) -> float:
    """Median ms of ``fn(*args, **kwargs)`` (dict arguments copied per call: launchers pop from them)."""
    return triton.testing.do_bench(
        lambda: fn(*args, **{k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}),
        warmup=10,
        rep=40,
    )


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
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    configs = parse_configs(args.configs)
    rows = []
    gpu = device_name(torch.device("cuda"))
    totals: dict[tuple[str, str], float] = {}
    for name, (n, k) in SHAPES.items():
        x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        ms = timed(torch.mm, x, w.t())
        totals["bf16", "cuBLAS"] = totals.get(("bf16", "cuBLAS"), 0.0) + ms
        rows.append({"method": "bf16", "shape": name, "path": "cuBLAS", "ms": ms})
        del w
    for spec in split_methods([args.methods]):
        for name, (n, k) in SHAPES.items():
            module = layer(spec, n, k)
            lay = layout_for(module)
            x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
            rf = None
            if lay.act_quant != ACT_NONE:
                x, rf = act_quant(x, lay.act_quant, lay.threshold, False, k)
            ref = dequant.dense_matmul(x, lay, row_factor=rf)
            ms = timed(dequant.dense_matmul, x, lay, row_factor=rf)
            rows.append({"method": spec, "shape": name, "path": "slab", "ms": ms})
            totals[spec, "slab"] = totals.get((spec, "slab"), 0.0) + ms
            base = prompt_config(args.m, n, k, lay.bits, lay.group)
            for label, over in configs:
                cfg = {**base, **{key: v for key, v in over.items() if key != "split"}}
                if "split" in over:
                    cfg["SPLIT_K"] = max(1, int(cfg["SPLIT_K"] * over["split"]))
                try:
                    out = prompt_gemm(x, lay, row_factor=rf, config=dict(cfg))
                    err = float((out.double() - ref.double()).norm() / ref.double().norm())
                    ms = timed(prompt_gemm, x, lay, row_factor=rf, config=cfg)
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
            del module, lay
    print(f"\nlinears of one prompt pass ({LAYERS} layers, M = {args.m}) on {gpu}:")
    for (spec, label), ms in totals.items():
        print(f"{spec:24s} {label:28s} {ms * LAYERS:7.2f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": gpu, "m": args.m, "rows": rows,
                       "layer_ms": {f"{s}|{lab}": v * LAYERS for (s, lab), v in totals.items()}}, fh, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
