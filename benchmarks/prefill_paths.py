"""First-token time of the engine's prompt pass on a random-weight 7B, by path: the fused prompt GEMM
(``kernels/prompt_gemm.py``), dequantized L2 slabs + cuBLAS, or ``wq_matmul``; CUDA graph vs eager; plus
the top kernels of one pass.

    python benchmarks/prefill_paths.py --method int4:group=128 --prompt 128
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import quantbench
from quantbench.engine import Engine, EngineOptions
from quantbench.engine.options import PROMPT_KERNELS


def first_token_ms(engine: Engine, ids: torch.Tensor, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats + 1):  # the first call compiles / captures
        engine.generate(ids, max_new_tokens=2, ignore_eos=True)
        times.append(engine.timing.first_token_ms)
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="mistral-7b")
    ap.add_argument("--method", default="int4:group=128")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--slab-mib", default="", help="also time the slab path at these scratch sizes, e.g. 8,16,48"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = quantbench.random_model(args.arch, dtype="bf16", device="cuda")
    quantbench.quantize(model, args.method)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), device="cuda")
    rows = []
    for path in PROMPT_KERNELS:
        for graphs in (True, False):
            engine = Engine(model, cuda_graphs=graphs, options=EngineOptions(prompt_kernel=path))
            t = first_token_ms(engine, ids, args.repeats)
            row = {"prompt_path": path, "graphs": graphs, "first_token_ms": round(statistics.median(t), 2),
                   "all": [round(v, 2) for v in t], "path": engine.path,
                   "prefill_graphs": engine.graphs.prefill_captured if engine.graphs else 0}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            del engine
    for mib in [int(v) for v in args.slab_mib.split(",") if v]:
        slabs = EngineOptions(prompt_kernel="slabs", slab_elems=mib << 19)  # bf16 elements
        engine = Engine(model, cuda_graphs=True, options=slabs)
        t = first_token_ms(engine, ids, args.repeats)
        row = {"prompt_path": "slabs", "graphs": True, "slab_mib": mib, "first_token_ms": round(statistics.median(t), 2),
               "all": [round(v, 2) for v in t]}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        del engine
    engine = Engine(model, cuda_graphs=False)
    engine.generate(ids, max_new_tokens=2, ignore_eos=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.generate(ids, max_new_tokens=2, ignore_eos=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"method": args.method, "prompt": args.prompt, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
