"""LLM.int8 activation quantization of evaluation-sized batches: each kernel's time and achieved bandwidth.

    python benchmarks/act_quant_bw.py --m 3300,8192 --k 3584,18944 --json act-quant.json

Evaluation quantizes a product's input (M tokens x K columns, bf16) before the slab product. The rows: the
producers that write an input (RMSNorm of K columns, the SiLU-gate of 2K), alone and recording LLM.int8's
outlier columns (``fused.outlier_columns``); the column-maxima pass over every token; the whole-row
quantization (one program per token, the default); and a device copy of the input for scale.
Bytes per call: every tensor read plus written once. Timing: ``kernel_bw.bench`` (CUDA-graph replays, L2
flushed before each, median). Inputs are normal; the quantizers' input is the SiLU-gate of one (a gate
column times 10 makes outlier columns).
"""

from __future__ import annotations

import argparse
import json

import torch

from quantbench.bench.runner import device_name
from quantbench.engine import EngineOptions
from quantbench.engine.kernels import fused
from quantbench.engine.kernels.fused import OutlierColumns
from quantbench.engine.kernels.layouts import ACT_LLM_INT8

THRESHOLD = 6.0


def record(k: int) -> OutlierColumns:
    return OutlierColumns(torch.zeros((k,), device="cuda", dtype=torch.int32), THRESHOLD)


def cases(m: int, k: int) -> list[tuple[str, object, int]]:
    """(name, call, bytes read + written) for one input size."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16)
    gate_up[:, 7] *= 10  # an outlier column of the SiLU-gate's result
    h = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    out = torch.empty_like(x)
    opts = EngineOptions()
    with_cols = record(k)
    q_in, q_rec = torch.empty_like(x), record(k)
    fused.silu_mul(gate_up, out=q_in, outliers=q_rec)  # the quantizers' input and its record
    size = 2 * m * k
    quant = fused.act_quant
    return [
        ("copy", lambda: out.copy_(x), 2 * size),
        ("rmsnorm", lambda: fused.add_rmsnorm(h, None, weight, 1e-6, out), 2 * size),
        ("rmsnorm + outlier columns", lambda: fused.add_rmsnorm(h, None, weight, 1e-6, out, outliers=with_cols),
         2 * size),
        ("silu_mul", lambda: fused.silu_mul(gate_up, out=out), 3 * size),
        ("silu_mul + outlier columns", lambda: fused.silu_mul(gate_up, out=out, outliers=with_cols), 3 * size),
        ("column-maxima pass", lambda: fused._merged_colmax(q_in, k, False, opts, {"PDL": False}), size),
        ("whole-row quantization", lambda: quant(q_in, ACT_LLM_INT8, THRESHOLD, False, k, opts, fold=True,
                                                  outliers=q_rec), 2 * size),
    ]  # fmt: skip


def main() -> None:
    from kernel_bw import bench

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="3300,8192", help="tokens per product (comma list)")
    ap.add_argument("--k", default="3584,18944", help="input columns (comma list)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    print(f"device {device_name(torch.device('cuda'))}")
    print(f"{'M':>6} {'K':>6}  {'kernel':32s} {'us':>8} {'GB/s':>7}")
    for m in (int(v) for v in args.m.split(",")):
        for k in (int(v) for v in args.k.split(",")):
            for name, call, nbytes in cases(m, k):
                ms = bench(call)
                rows.append({"m": m, "k": k, "kernel": name, "us": ms * 1e3, "gbps": nbytes / ms / 1e6})
                print(f"{m:6d} {k:6d}  {name:32s} {ms * 1e3:8.1f} {nbytes / ms / 1e6:7.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device_name(torch.device("cuda")), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
