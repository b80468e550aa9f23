"""W8A8 activation quantization of one prompt pass, by tile configuration (needs a CUDA GPU).

    python benchmarks/act_quant_sweep.py --kinds llm.int8,fp8 --m 128 \
        --configs "base;outlier=256,16,16,256;outlier=32,256,256,256+pdl" --json sweep.json

One pass is Mistral-7B's 32 layers x the inputs of qkv, o and gate/up (4096 columns) and down (14336),
each ``fused.act_quant`` call captured in one CUDA graph; the time is the median of ``--repeats``
replays. A configuration replaces ``EngineOptions.act_tiles_NAME`` (``NAME=columns,tokens,load_tokens,
apply_columns`` with NAME decode / prompt / outlier; items joined by ``+``); ``pdl`` launches the
prompt-sized kernels with programmatic dependent launch (``act_prompt_pdl``); ``rows`` / ``passes``: one
whole-row program per token above 64 tokens / never (``act_rows_min_m``; default: from 512 tokens). The activations are normal with a few columns past the LLM.int8 threshold.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from quantbench.bench.runner import device_name
from quantbench.engine import EngineOptions
from quantbench.engine.kernels import fused
from quantbench.engine.kernels.layouts import ACT_FP8, ACT_INT8_TOKEN, ACT_LLM_INT8

KINDS = {"llm.int8": ACT_LLM_INT8, "fp8": ACT_FP8, "smoothquant": ACT_INT8_TOKEN}
WIDTHS = (4096, 4096, 4096, 14336)  # inputs of qkv, o, gate/up, down


def config_options(text: str) -> EngineOptions:
    """The options of configuration ``text`` (items joined by ``+``)."""
    fields = {}
    for item in text.split("+"):
        if item == "pdl":
            fields["act_prompt_pdl"] = True
        elif item == "rows":
            fields["act_rows_min_m"] = 65
        elif item == "passes":
            fields["act_rows_min_m"] = 0
        elif "=" in item:
            name, _, values = item.partition("=")
            fields[f"act_tiles_{name}"] = tuple(int(v) for v in values.split(","))
    return EngineOptions(**fields)


def time_pass(kind: int, m: int, layers: int, repeats: int, options: EngineOptions) -> float:
    gen = torch.Generator(device="cuda").manual_seed(m)
    inputs = []
    for k in WIDTHS:
        x = torch.randn((m, k), device="cuda", dtype=torch.bfloat16, generator=gen)
        x[:, :: k // 6] *= 40.0  # six outlier columns
        inputs.append(x)
    for x in inputs:  # compile outside the capture
        fused.act_quant(x, kind, 6.0, False, x.shape[1], options)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for _ in range(layers):
            for x in inputs:
                fused.act_quant(x, kind, 6.0, False, x.shape[1], options)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="llm.int8,fp8")
    ap.add_argument("--m", default="128")
    ap.add_argument("--configs", default="base")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    print(device_name(torch.device("cuda")))
    for kind_name in args.kinds.split(","):
        for m in [int(v) for v in args.m.split(",")]:
            for config in args.configs.split(";"):
                us = time_pass(KINDS[kind_name], m, args.layers, args.repeats, config_options(config))
                row = {"kind": kind_name, "m": m, "config": config, "pass_us": round(us, 1),
                       "per_product_us": round(us / (args.layers * len(WIDTHS)), 2)}  # fmt: skip
                rows.append(row)
                print(
                    f"{kind_name:10s} m={m:4d} {config:36s} {us:9.1f} us/pass {row['per_product_us']:6.2f} us/product"
                )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device_name(torch.device("cuda")), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
