"""Micro-benchmark of the quantized-linear kernels: achieved bandwidth (GB/s and % of the measured
device copy bandwidth) per method, layer shape and M, plus an optional block-size sweep.

    python benchmarks/kernel_bw.py [--sweep] [--json out.json]

Shapes are Mistral-7B's four products (qkv fused, o, gate/up fused, down). Bytes per call = the
layer's stored weight bytes (codes + scales + zeros) + x + output. Timing: CUDA events around a CUDA
graph replay of one call (L2 flushed before each, median of 25). bf16 rows are cuBLAS (``F.linear``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from quantbench import parse_spec
from quantbench.bench.runner import device_name, measure_copy_bandwidth
from quantbench.engine import EngineOptions
from quantbench.engine.kernels import layout_for, linear
from quantbench.engine.kernels.layouts import tile_buffers
from quantbench.engine.kernels.routing import h2_supported
from quantbench.engine.kernels.wq_matmul import pick_config, wq_matmul
from quantbench.quant import METHODS

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
METHOD_SPECS = [
    "int4:group=128",
    "int8",
    "nf4:block=64",
    "nf4:block=64,dq=1",
    "fp4:block=64",
    "fp8",
    "llm.int8:compute=bf16",
]

# Candidate configs; BK is given in words per row (x VALS codes), SPLIT_K as a factor on the heuristic.
SWEEP_M1 = [
    {"USE_DOT": False, "BM": 1, "BN": bn, "WORDS": wd, "num_warps": w, "num_stages": st, "SPLIT_X": sx}
    for bn, wd, w, st, sx in [
        (128, 16, 4, 3, 1),
        (128, 16, 4, 3, 2),
        (64, 16, 4, 3, 2),
        (64, 32, 4, 3, 1),
        (256, 16, 8, 3, 1),
        (128, 32, 8, 3, 1),
    ]
]
SWEEP_M8 = [
    {"USE_DOT": True, "BM": 16, "BN": bn, "WORDS": wd, "num_warps": w, "num_stages": st, "SPLIT_X": sx}
    for bn, wd, w, st, sx in [
        (128, 16, 4, 3, 1),
        (128, 16, 4, 3, 2),
        (64, 16, 4, 3, 1),
        (64, 16, 4, 3, 2),
        (128, 32, 4, 3, 1),
    ]
]
SWEEP_PREFILL = [
    {"USE_DOT": True, "BM": bm, "BN": bn, "WORDS": wd, "num_warps": w, "num_stages": st, "SPLIT_X": 1}
    for bm, bn, wd, w, st in [
        (64, 64, 16, 4, 4),
        (128, 64, 16, 4, 4),
        (64, 128, 16, 4, 4),
        (128, 128, 16, 8, 3),
        (64, 64, 32, 4, 3),
    ]
]


H2_SWEEP = [
    {"BN": bn, "BKV": bkv, "num_warps": w, "SPLIT_X": sx, "STAGES": st}
    for bn in (32, 64, 128)
    for bkv in (8, 16, 32)
    for w in (2, 4)
    for sx in (1, 2)
    for st in (1, 3)
    if bn * bkv // (32 * w) >= 2  # at least two words per thread
]


def gemv_case(spec: str, n: int, k: int):
    """A quantized layer for the M = 1 sweeps: module, layout, x, bytes per call, default config."""
    from quantbench.engine.kernels.gemv_h2 import _config

    mod = make_module(spec, n, k)
    layout = layout_for(mod)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    return mod, layout, x, layout.weight_bytes + k * 2 + n * 2, _config(n, k, layout, x.device)


def h2_sweep(results: dict, record, shapes: dict, specs: list[str]) -> None:
    """Time the half2 GEMV (M = 1) over block sizes / warps / split-K on each shape; print the best."""
    from quantbench.engine.kernels.gemv_h2 import gemv_h2

    for spec in specs:
        for name, (n, k) in shapes.items():
            mod, layout, x, nbytes, default = gemv_case(spec, n, k)
            rows = []
            for cand in [default, *H2_SWEEP]:
                cfg = {key: v for key, v in cand.items() if key != "SPLIT_X"}
                vals = 32 // layout.bits
                if (k // vals) % cfg["BKV"]:
                    continue
                cfg["SPLIT_K"] = max(
                    1, min(int(default["SPLIT_K"] * cand.get("SPLIT_X", 1)), k // (cfg["BKV"] * vals))
                )
                try:
                    t = bench(lambda x=x, layout=layout, c=cfg: gemv_h2(x, layout, config=dict(c)))
                except Exception as exc:  # noqa: BLE001
                    print(f"  h2 cfg {cfg} failed: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
                    continue
                rows.append(record(spec + " (h2 sweep)", name, 1, t, nbytes, cfg=cfg))
            results["sweep"].extend(rows)
            best = min(rows, key=lambda r: r["ms"])
            print(f"  h2 sweep best {spec:16s} {name:8s} {best['ms'] * 1e3:8.1f} us {best['pct_copy']:5.1f}%  {best['cfg']}  "
                  f"(default {rows[0]['ms'] * 1e3:.1f} us {default})", flush=True)  # fmt: skip
            del mod, layout
            torch.cuda.empty_cache()


TILED_SWEEP = {
    4: [
        (bn, bkv, w, st)
        for bn, bkv in ((128, 16), (64, 16), (64, 32), (32, 32), (256, 8), (128, 8), (32, 64))
        for w in (2, 4)
        for st in (1, 3)
    ],
    8: [
        (bn, bkv, w, st)
        for bn, bkv in ((32, 32), (64, 32), (16, 64), (64, 16), (128, 16))
        for w in (2, 4)
        for st in (1, 3)
    ],
}


def tiled_layout(module, bn: int, bkv: int):
    """The kernel layout of a copy of ``module`` whose codes (and group scales / zeros) are stored
    tile-major in (bn rows x bkv words) steps, or None when the shape does not tile so."""
    import copy

    tiles = tile_buffers(module, layout_for(module), bn, bkv)
    if tiles is None:
        return None
    twin = copy.deepcopy(module)
    twin.store_tiled(tiles)
    return layout_for(twin)


def tiled_sweep(results: dict, record, shapes: dict, specs: list[str]) -> None:
    """Half2 GEMV on row-major vs tile-major codes, same block sizes: time and bitwise agreement."""
    from quantbench.engine.kernels.gemv_h2 import _config, gemv_h2

    for spec in specs:
        for name, (n, k) in shapes.items():
            mod, layout, x, nbytes, default = gemv_case(spec, n, k)
            vals = 32 // layout.bits
            t0 = bench(lambda x=x, lay=layout, c=default: gemv_h2(x, lay, config=dict(c)))
            results["sweep"].append(record(spec + " (row-major, default)", name, 1, t0, nbytes, cfg=default))
            ref = gemv_h2(x, layout, config=dict(default)).float()
            rows, tiled_cache = [], {}
            for bn, bkv, w, st in TILED_SWEEP[layout.bits]:
                if (k // vals) % bkv:
                    continue
                if (bn, bkv) not in tiled_cache:
                    tiled_cache[(bn, bkv)] = tiled_layout(mod, bn, bkv)
                tl_ = tiled_cache[(bn, bkv)]
                if tl_ is None:
                    continue
                base = _config(n, k, tl_, x.device)
                for sx in (1, 2):
                    split = max(1, min(base["SPLIT_K"] * sx, k // (bkv * vals)))
                    cfg = {"BN": bn, "BKV": bkv, "SPLIT_K": split, "num_warps": w, "STAGES": st}
                    try:
                        t = bench(lambda x=x, c=cfg, lay=tl_: gemv_h2(x, lay, config=dict(c)))
                        got = gemv_h2(x, tl_, config=dict(cfg)).float()
                    except Exception as exc:  # noqa: BLE001
                        print(f"  tiled cfg {cfg} failed: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
                        continue
                    err = float((got - ref).abs().max() / ref.abs().max())
                    row = record(spec + " (tiled)", name, 1, t, nbytes, cfg=cfg)
                    row["rel_err_vs_row_major"] = err
                    rows.append(row)
            results["sweep"].extend(rows)
            best = min(rows, key=lambda r: r["ms"])
            print(f"  tiled best {spec:16s} {name:8s} {best['ms'] * 1e3:7.1f} us {best['pct_copy']:5.1f}% {best['cfg']} "
                  f"err {best['rel_err_vs_row_major']:.1e} | row-major default {t0 * 1e3:.1f} us "
                  f"{100 * nbytes / (t0 / 1e3) / 1e9 / results['copy_gbps']:.1f}%", flush=True)  # fmt: skip
            for r in sorted(rows, key=lambda r: r["ms"])[:4]:
                print(f"     {r['ms'] * 1e3:7.1f} us {r['pct_copy']:5.1f}% {r['cfg']}", flush=True)
            del mod, layout, tiled_cache
            torch.cuda.empty_cache()


def concrete(cfg: dict, m: int, n: int, k: int, layout) -> dict:
    """A sweep entry -> kernel config for this shape ({} if BK does not fit K)."""
    from quantbench.engine.kernels.triton_common import num_sms, split_for
    from quantbench.engine.kernels.wq_matmul import fit_bk

    vals = 32 // layout.bits
    c = {key: v for key, v in cfg.items() if key not in ("WORDS", "SPLIT_X")}
    c["BK"] = cfg["WORDS"] * vals
    c = fit_bk(c, k, layout.bits, layout.group)
    if not c:
        return {}
    split = 1
    if m <= 16:
        split = max(1, int(split_for(m, n, k, c, num_sms(torch.device("cuda"))) * cfg["SPLIT_X"]))
        split = min(split, k // c["BK"])
    c["SPLIT_K"] = split
    return c


def make_module(spec: str, n: int, k: int):
    cfg = parse_spec(spec)
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    return METHODS[cfg.method].linear_cls.from_linear(lin, cfg)


_FLUSH: list[torch.Tensor] = []


def bench(fn, reps: int = 25) -> float:
    """Median ms of one call, from CUDA-graph replays (no Python launch overhead in the number: the
    quantized kernels' host-side launch costs tens of microseconds, more than many of them run) with
    the L2 cache flushed before each replay; a replay adds ~2-4 us of graph launch."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(64 << 20, device="cuda", dtype=torch.float32))  # 256 MiB > L2
    fn()  # compile, allocate workspaces
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps):
        _FLUSH[0].zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--sweep", action="store_true", help="time every candidate block config (int4, int8, nf4)"
    )
    ap.add_argument("--sweep-h2", action="store_true", help="only: block-size sweep of the M = 1 half2 GEMV")
    ap.add_argument("--tiled", action="store_true", help="only: half2 GEMV on tile-major vs row-major codes")
    ap.add_argument("--json", default=None)
    ap.add_argument("--ms", default="1,8,128")
    args = ap.parse_args()
    copy = measure_copy_bandwidth(torch.device("cuda"))
    print(
        f"device {device_name(torch.device('cuda'))}; copy bandwidth {copy:.0f} GB/s (read+write)", flush=True
    )
    ms = [int(m) for m in args.ms.split(",")]
    results = {"device": device_name(torch.device("cuda")), "copy_gbps": copy, "rows": [], "sweep": []}

    def record(method, shape, m, ms_time, nbytes, cfg=None, flops=None):
        gbps = nbytes / (ms_time / 1e3) / 1e9
        row = {
            "method": method, "shape": shape, "M": m, "ms": round(ms_time, 5), "GBps": round(gbps, 1),
            "pct_copy": round(100 * gbps / copy, 1), "cfg": cfg,
            "TFLOPs": round(flops / (ms_time / 1e3) / 1e12, 1) if flops else None,
        }  # fmt: skip
        return row

    if args.tiled:
        tiled_sweep(results, record, SHAPES, ["int4:group=128"])
        tiled_sweep(
            results, record, {"gate_up": SHAPES["gate_up"]}, ["int8", "nf4:block=64", "int4:group=128,sym=0"]
        )
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=1)
        return
    if args.sweep_h2:
        h2_sweep(results, record, SHAPES, ["int4:group=128"])
        h2_sweep(results, record, {"gate_up": SHAPES["gate_up"]}, ["int8", "nf4:block=64"])
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=1)
        return
    # bf16 cuBLAS reference rows
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t = bench(lambda x=x, w=w: F.linear(x, w))
            row = record(
                "bf16 (cuBLAS)", name, m, t, w.numel() * 2 + x.numel() * 2 + m * n * 2, flops=2 * m * n * k
            )
            results["rows"].append(row)
        del w
    for spec in METHOD_SPECS:
        for name, (n, k) in SHAPES.items():
            mod = make_module(spec, n, k)
            layout = layout_for(mod)
            if layout is None:
                print(f"{spec}: no kernel layout", flush=True)
                continue
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                nbytes = layout.weight_bytes + x.numel() * 2 + m * n * 2
                if layout.act_quant and m > 16:
                    t = bench(lambda x=x, mod=mod: mod(x))
                    label = spec + " (module's own cuBLAS path)"
                else:
                    t = bench(lambda x=x, layout=layout: linear(layout, x))
                    label = spec + (" (PRMT decode)" if layout.mode == 1 else "")
                    if m == 1 and h2_supported(x, layout):  # the half2 GEMV; time the fp32 path too
                        label = spec + " (h2 GEMV)"
                        no_h2 = EngineOptions(h2=False)
                        t_old = bench(lambda x=x, layout=layout, o=no_h2: linear(layout, x, options=o))
                        row_old = record(spec + " (fp32 path)", name, m, t_old, nbytes, flops=2 * m * n * k)
                        results["rows"].append(row_old)
                        print(
                            f"{row_old['method']:44s} {name:8s} M={m:<5d} {t_old * 1e3:9.1f} us {row_old['pct_copy']:6.1f}% of copy",
                            flush=True,
                        )
                    if layout.mode == 1 and m > 1:  # NF4 / FP4: also the L1 table-lookup decoder
                        lookup = EngineOptions(table_prmt=False)
                        t2 = bench(lambda x=x, layout=layout, o=lookup: linear(layout, x, options=o))
                        row2 = record(spec + " (L1 lookup)", name, m, t2, nbytes, flops=2 * m * n * k)
                        results["rows"].append(row2)
                        print(
                            f"{row2['method']:44s} {name:8s} M={m:<5d} {t2 * 1e3:9.1f} us {row2['pct_copy']:6.1f}% of copy",
                            flush=True,
                        )
                row = record(label, name, m, t, nbytes, flops=2 * m * n * k)
                results["rows"].append(row)
                print(
                    f"{label:44s} {name:8s} M={m:<5d} {t * 1e3:9.1f} us {row['pct_copy']:6.1f}% of copy",
                    flush=True,
                )
                if args.sweep and spec in ("int4:group=128", "int8", "nf4:block=64") and not layout.act_quant:
                    cands = SWEEP_M1 if m == 1 else SWEEP_M8 if m <= 16 else SWEEP_PREFILL
                    for cfg in cands:
                        fitted = concrete(cfg, m, n, k, layout)
                        if not fitted:
                            continue
                        try:
                            t = bench(lambda x=x, layout=layout, c=fitted: wq_matmul(x, layout, config=c))
                        except Exception as exc:  # noqa: BLE001
                            print(
                                f"  cfg {fitted} failed: {type(exc).__name__}: {str(exc)[:100]}", flush=True
                            )
                            continue
                        results["sweep"].append(record(spec, name, m, t, nbytes, cfg=fitted))
                    best = min(
                        (
                            r
                            for r in results["sweep"]
                            if r["method"] == spec and r["shape"] == name and r["M"] == m
                        ),
                        key=lambda r: r["ms"],
                        default=None,
                    )
                    if best:
                        print(
                            f"  sweep best {spec:16s} {name:8s} M={m:<4d} {best['ms'] * 1e3:8.1f} us {best['pct_copy']:5.1f}%  {best['cfg']}  (default {pick_config(m, n, k, layout.bits, layout.group, x.device)})",
                            flush=True,
                        )
            del mod, layout
            torch.cuda.empty_cache()
    print(f"\n{'method':44s} {'shape':8s} {'M':>5s} {'us':>9s} {'GB/s':>8s} {'%copy':>6s} {'TFLOP/s':>8s}")
    for r in results["rows"]:
        print(
            f"{r['method']:44s} {r['shape']:8s} {r['M']:5d} {r['ms'] * 1e3:9.1f} {r['GBps']:8.0f} {r['pct_copy']:6.1f} {r['TFLOPs'] or 0:8.1f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
