"""W8A8 products of evaluation-sized batches: 8-bit tensor cores (``kernels/w8a8_gemm.py``, by tile
configuration) against dequantized slabs + cuBLAS (the default) and bf16 cuBLAS (needs a CUDA GPU; fp8
an sm_89+ one).

    python benchmarks/w8a8_gemm_sweep.py --methods llm.int8,smoothquant,fp8 --m 1024,2752 \
        --tiles "128,128,128,8,8,3;128,256,128,8,8,3" --json sweep.json

Shapes: one layer of Qwen2.5-7B (q/k/v fused 3584 -> 4608, o 3584 -> 3584, gate/up fused 3584 -> 37888,
down 18944 -> 3584), codes tile-major as the engine stores them, activations normal. LLM.int8 without
outlier decomposition (threshold 0): with its threshold the engine runs its products on the slabs. Each
product is launched eagerly, as evaluation launches it, activation quantization included; the time is the
median of ``--repeats`` CUDA-event timings of the layer's four products. Every configuration's output is
checked against the slab path's (relative error). fp8 runs each tile configuration once per ``--fp8-mma``
value (``EngineOptions.w8a8_fp8_mma``: fp16, the codes widened on 16-bit tensor cores with fp32 sums, or
e4m3, the fp8 tensor cores' own accumulation).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import torch

from quantbench.bench.runner import device_name
from quantbench.engine import EngineOptions
from quantbench.engine.kernels import linear
from quantbench.engine.kernels.layouts import layout_for, tiling_for
from quantbench.quant import METHODS, parse_spec

SHAPES = {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584)}
SPECS = {"llm.int8": "llm.int8:compute=bf16,threshold=0", "smoothquant": "smoothquant", "fp8": "fp8"}


def layer(spec: str) -> dict[str, torch.nn.Module]:
    cfg = parse_spec(spec)
    mods = {}
    for name, (k, n) in SHAPES.items():
        lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="cuda")
        torch.nn.init.normal_(lin.weight, 0.0, 0.02)
        mod = METHODS[cfg.method].linear_cls.from_linear(lin, cfg).cuda()
        tiles = tiling_for(mod, EngineOptions())
        if tiles:
            mod.store_tiled(tiles)
        mods[name] = mod
    return mods


def products(
    layouts: dict, xs: dict[str, torch.Tensor], dense: dict[str, torch.Tensor], options: EngineOptions | None
) -> dict[str, torch.Tensor]:
    """The layer's four products: bf16 cuBLAS on ``dense`` weights (``options`` None) or the layouts' kernels."""
    if options is None:
        return {name: xs[name] @ dense[name].t() for name in SHAPES}
    return {name: linear(layouts[name], xs[name], options=options) for name in SHAPES}


def time_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="llm.int8,smoothquant,fp8")
    ap.add_argument("--m", default="512,1024,2752,4096", help="tokens per product (comma list)")
    ap.add_argument("--tiles", default="128,128,128,8,8,3;128,256,128,8,8,3;256,128,128,8,8,3;128,128,64,8,4,4",
                    help="';'-separated EngineOptions.w8a8_gemm_tiles")  # fmt: skip
    ap.add_argument("--fp8-mma", default="fp16,e4m3",
                    help="fp8: EngineOptions.w8a8_fp8_mma values to time (comma list)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tiles = [tuple(int(v) for v in t.split(",")) for t in args.tiles.split(";") if t]
    mmas = [v for v in args.fp8_mma.split(",") if v]
    rows = []
    for method in args.methods.split(","):
        mods = layer(SPECS[method])
        layouts = {name: layout_for(mod) for name, mod in mods.items()}
        for m in (int(v) for v in args.m.split(",")):
            xs = {
                name: torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                for name, (k, _) in SHAPES.items()
            }
            dense = {
                name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                for name, (k, n) in SHAPES.items()
            }

            slabs = EngineOptions(w8a8_gemm=frozenset())
            base = products(layouts, xs, dense, slabs)
            for label, options in [("bf16 cuBLAS", None), ("slabs", slabs)] + [
                (f"8-bit {t}" + (f" {mma}" if method == "fp8" else ""),
                 EngineOptions(w8a8_gemm_tiles=t, w8a8_fp8_mma=mma))
                for t in tiles for mma in (mmas if method == "fp8" else mmas[:1])
            ]:  # fmt: skip
                row = {"method": method, "m": m, "path": label}
                try:
                    out = products(layouts, xs, dense, options)
                    if options is not None:
                        row["rel_err"] = max(
                            float((out[n].double() - base[n].double()).norm() / base[n].double().norm())
                            for n in SHAPES
                        )
                    row["ms"] = time_ms(
                        functools.partial(products, layouts, xs, dense, options), args.repeats
                    )
                except Exception as exc:  # noqa: BLE001 - a configuration that does not compile: report it
                    row["error"] = (
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                    )
                rows.append(row)
                print(
                    f"{method:12s} m {m:5d} {label:34s} "
                    + (
                        f"{row['ms']:8.3f} ms  rel err {row.get('rel_err', 0.0):.1e}"
                        if "ms" in row
                        else row["error"]
                    ),
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device_name(torch.device("cuda")), "args": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
