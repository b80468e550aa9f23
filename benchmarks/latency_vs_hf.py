"""quantbench's engine against Hugging Face generate on random-weight Mistral-7B (needs a CUDA GPU).

Rows: HF eager bf16, HF + bitsandbytes NF4 (``Linear4bit``, no double quant, bf16 compute), HF +
bitsandbytes LLM.int8 (``Linear8bitLt``, threshold 6.0), then quantbench's engine for each method.
Per row: first-token latency (prompt + 1 token), per-token decode latency, decode tokens/s, peak GPU
memory, weight GiB and % of the measured copy bandwidth reached by one decode step.

HF timing: CUDA events around ``model.generate``; first token = ``max_new_tokens=1``; per token =
(time for ``--output`` tokens - first token) / (output - 1); median of ``--hf-repeats``, after one
warm-up generation. quantbench rows come from ``quantbench.bench.bench_methods`` (engine timings).

    python benchmarks/latency_vs_hf.py --json out.json [--batch 1,8] [--input 128] [--output 128]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch
from torch import nn

import quantbench
from quantbench.bench.runner import bench_methods, device_name, measure_copy_bandwidth
from quantbench.quant.apply import model_bytes

DEFAULT_METHODS = [
    "bf16",
    "int8",
    "fp8",
    "llm.int8:compute=bf16",
    "nf4:block=64",
    "nf4:block=64,dq=1",
    "fp4:block=64",
    "int4:group=128",
]


def to_bnb(model: nn.Module, kind: str) -> nn.Module:
    """Swap every decoder nn.Linear for a bitsandbytes layer (quantized on the way to the GPU)."""
    import bitsandbytes as bnb

    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or "lm_head" in name:
            continue
        w = mod.weight.data.cpu()
        if kind == "nf4":
            new = bnb.nn.Linear4bit(
                mod.in_features, mod.out_features, bias=mod.bias is not None, compute_dtype=torch.bfloat16,
                quant_type="nf4", compress_statistics=False, device="meta",
            )  # fmt: skip
            new.weight = bnb.nn.Params4bit(
                w, requires_grad=False, quant_type="nf4", compress_statistics=False
            )
        else:
            new = bnb.nn.Linear8bitLt(
                mod.in_features, mod.out_features, bias=mod.bias is not None, has_fp16_weights=False,
                threshold=6.0, device="meta",
            )  # fmt: skip
            new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        if mod.bias is not None:
            new.bias = nn.Parameter(mod.bias.data.cpu(), requires_grad=False)
        new = new.to("cuda")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        mod.weight = None
    torch.cuda.empty_cache()
    return model


def time_hf(model: nn.Module, batch: int, input_len: int, output_len: int, repeats: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch, input_len), device="cuda")
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        b.record()
        b.synchronize()
        return a.elapsed_time(b)

    run(4)  # warm-up
    first = statistics.median(run(1) for _ in range(repeats))
    total = statistics.median(run(output_len) for _ in range(repeats))
    return {"first_token_ms": first, "per_token_ms": (total - first) / (output_len - 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mistral-7b")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--input", type=int, default=128)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-repeats", type=int, default=2)
    ap.add_argument("--methods", default=";".join(DEFAULT_METHODS))
    ap.add_argument("--hf", default="bf16,nf4,llm.int8", help="HF baselines to run ('' = none)")
    ap.add_argument("--hf-batch", default=None, help="batch sizes for the HF rows (default: --batch)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    dev = torch.device("cuda")
    copy = measure_copy_bandwidth(dev)
    name = device_name(dev)
    print(f"{name}: copy bandwidth {copy:.0f} GB/s (read + write)", flush=True)
    rows = []

    def save() -> None:  # after every row: a run cut short keeps what it measured
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(
                    {"device": name, "copy_gbps": copy, "model": args.model, "rows": rows}, fh, indent=1
                )

    for kind in [k for k in args.hf.split(",") if k]:
        t0 = time.perf_counter()
        torch.cuda.reset_peak_memory_stats()
        model = quantbench.random_model(args.model, dtype="bf16", device="cuda")
        if kind != "bf16":
            to_bnb(model, "nf4" if kind == "nf4" else "int8")
        setup = time.perf_counter() - t0
        weights = model_bytes(model)
        for batch in [int(b) for b in (args.hf_batch or args.batch).split(",")]:
            res = time_hf(model, batch, args.input, args.output, args.hf_repeats)
            pct = 100 * weights / (res["per_token_ms"] / 1e3) / (copy * 1e9)
            row = {
                "impl": "HF generate", "method": {"bf16": "bf16", "nf4": "bnb nf4", "llm.int8": "bnb LLM.int8"}[kind],
                "batch": batch, **{k: round(v, 3) for k, v in res.items()},
                "tokens_per_s": round(batch * 1e3 / res["per_token_ms"], 1),
                "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "weights_gib": round(weights / 2**30, 2), "pct_bw": round(pct, 1), "setup_s": round(setup, 1),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            save()
        del model
        gc.collect()
        torch.cuda.empty_cache()
    specs = [s for s in args.methods.split(";") if s]
    for r in bench_methods(
        f"random:{args.model}",
        specs,
        batches,
        args.input,
        args.output,
        dev,
        repeats=args.repeats,
        copy_gbps=copy,
    ):
        rows.append({"impl": "quantbench engine", **r.to_dict()})
        print(json.dumps(rows[-1]), flush=True)
        save()
    print(f"\n{name}, random-weight {args.model}, {args.input} in + {args.output} out, copy {copy:.0f} GB/s")
    print(
        f"{'impl':18s} {'method':36s} {'b':>3s} {'first ms':>9s} {'ms/tok':>8s} {'tok/s':>8s} "
        f"{'%bw':>6s} {'peak GiB':>9s} {'weights':>8s}"
    )
    for r in rows:
        print(
            f"{r['impl']:18s} {r['method'][:36]:36s} {r['batch']:3d} {r['first_token_ms']:9.2f} "
            f"{r['per_token_ms']:8.3f} {r['tokens_per_s']:8.1f} {r['pct_bw']:6.1f} {r['peak_mem_gib']:9.2f} "
            f"{r['weights_gib']:8.2f}"
        )
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
