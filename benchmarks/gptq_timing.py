"""Wall time of GPTQ on a random-weight Mistral-7B on one GPU (128 x 2048 random calibration tokens).

    python benchmarks/gptq_timing.py                       # all 32 blocks
    python benchmarks/gptq_timing.py --max-seconds 300     # stop after 300 s, extrapolate (labeled)

Prints per-block times, the total (or the extrapolation to all blocks, clearly marked), peak GPU
memory, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import quantbench
from quantbench.quant.calib import CalibData


class _Deadline(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mistral-7b")
    parser.add_argument("--spec", default="gptq:bits=4,group=128")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--max-seconds", type=float, default=0, help="stop after this long and extrapolate")
    parser.add_argument("--json", type=Path, default=Path("gptq_timing.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    device = torch.device("cuda")
    t0 = time.perf_counter()
    model = quantbench.random_model(args.arch, dtype=args.dtype, device="cuda")
    torch.cuda.synchronize()
    built = time.perf_counter() - t0
    n_layers = model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len), generator=gen)
    blocks: list[float] = []
    marks = {"start": 0.0, "last": 0.0}
    torch.cuda.reset_peak_memory_stats()

    def log(line: str) -> None:
        now = time.perf_counter()
        print(f"[{now - marks['start']:7.1f}s] {line}", flush=True)
        if line.startswith("block "):
            blocks.append(now - marks["last"])
            marks["last"] = now
            if args.max_seconds and now - marks["start"] > args.max_seconds and len(blocks) < n_layers:
                raise _Deadline
        elif line.startswith("captured"):
            marks["capture"] = now - marks["start"]
            marks["last"] = now

    marks["start"] = marks["last"] = time.perf_counter()
    complete = True
    try:
        quantbench.quantize(
            model, args.spec, calib=CalibData(ids, source="random tokens"), device=device, log=log
        )
    except _Deadline:
        complete = False
    torch.cuda.synchronize()
    total = time.perf_counter() - marks["start"]
    capture = marks.get("capture", 0.0)
    per_block = sum(blocks) / len(blocks)
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "arch": args.arch,
        "spec": args.spec,
        "dtype": args.dtype,
        "calibration": f"{args.samples}x{args.seq_len} random tokens",
        "model_build_s": round(built, 1),
        "capture_s": round(capture, 1),
        "blocks_done": len(blocks),
        "blocks_total": n_layers,
        "block_s": [round(b, 2) for b in blocks],
        "mean_block_s": round(per_block, 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "complete": complete,
    }
    if complete:
        result["total_s"] = round(total, 1)
        print(f"GPTQ {args.spec} on {args.arch}: all {n_layers} blocks in {total:.1f}s (measured)")
    else:
        estimate = capture + per_block * n_layers
        result["measured_s"] = round(total, 1)
        result["extrapolated_total_s"] = round(estimate, 1)
        print(
            f"GPTQ {args.spec} on {args.arch}: {len(blocks)}/{n_layers} blocks in {total:.1f}s; "
            f"EXTRAPOLATED to {n_layers} blocks: {estimate:.0f}s (capture {capture:.1f}s + {per_block:.2f}s/block)"
        )
    print(json.dumps(result))
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
