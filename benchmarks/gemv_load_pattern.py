"""How fast the tensor-core GEMV's weight loads alone can go (needs a CUDA GPU).

    python benchmarks/gemv_load_pattern.py [--methods "int4:group=128;bf16"] [--json out.json]

For each of Mistral-7B's decode products (qkv, o, gate/up, down; and the LM head for bf16), a kernel with
``mma_gemv``'s own program geometry and load instructions reads the weights and nothing else: programs of
16 rows and 4 warps (or 8), each warp taking 1 KiB steps interleaved with its neighbours, one or two steps
requested ahead, the same K-splits (``mma_gemv._config`` on the real layout), no decode, no mma, no
activations. Its time is the floor any faster decode could reach with this kernel structure; the
``engine_ab.py`` variant ``loadonly`` measures the same bound inside whole decode steps. For bf16 weights
the table also times cuBLAS (``F.linear``, one token). Timing: a CUDA graph of 20 launches on rotating
copies of the weights (at least 768 MiB, so nothing is served from L2), median of ``--repeats`` replays.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import quantbench
from quantbench.bench.runner import device_name, measure_copy_bandwidth, split_methods
from quantbench.engine.kernels.mma_gemv import _asm_i32, _config, _load_step
from quantbench.engine.kernels.mma_ptx import load_asm

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
HEAD = (32000, 4096)
STEP = 1024  # bytes of one warp step of mma_gemv: 16 rows x 4 lanes x 16 bytes (int4 and bf16 alike)
STEP_BYTES = tl.constexpr(STEP)


@triton.jit
def _load_pattern_kernel(w_ptr, o_ptr, steps, NW: tl.constexpr, DEPTH: tl.constexpr, LOAD_ASM: tl.constexpr,
                         PAD_ASM: tl.constexpr):  # fmt: skip
    """Program p reads its ``steps`` x 1 KiB run; warp w takes steps w, w + NW, ...; lane l loads 16 bytes at
    ``l * 16`` and ``512 + l * 16`` of a step (rows g and g + 8 of mma_gemv's tiles)."""
    pid = tl.program_id(0)
    tid = tl.arange(0, 32 * NW)
    lane = tid % 32
    warp = tid // 32
    acc = _asm_i32(tid, tid, PAD_ASM)  # shared padding: as many programs per SM as the real kernel fits
    inc = NW * STEP_BYTES
    ptr_g = (w_ptr + (pid.to(tl.int64) * steps + warp) * (STEP_BYTES // 4) + lane * 4).to(
        tl.int64, bitcast=True
    )
    ptr_h = ptr_g + 512
    s = warp
    w0, w1, w2, w3, w4, w5, w6, w7 = _load_step(ptr_g, ptr_h, s < steps, s < steps, LOAD_ASM)
    if DEPTH == 2:
        u0, u1, u2, u3, u4, u5, u6, u7 = _load_step(ptr_g + inc, ptr_h + inc, s + NW < steps, s + NW < steps,
                                                    LOAD_ASM)  # fmt: skip
    for _ in range(tl.cdiv(steps, NW)):
        ptr_g += inc
        ptr_h += inc
        ahead = s + DEPTH * NW
        n0, n1, n2, n3, n4, n5, n6, n7 = _load_step(ptr_g + (DEPTH - 1) * inc, ptr_h + (DEPTH - 1) * inc,
                                                    ahead < steps, ahead < steps, LOAD_ASM)  # fmt: skip
        acc = acc ^ w0 ^ w1 ^ w2 ^ w3 ^ w4 ^ w5 ^ w6 ^ w7  # keeps the loads alive
        if DEPTH == 2:
            w0, w1, w2, w3, w4, w5, w6, w7 = u0, u1, u2, u3, u4, u5, u6, u7
            u0, u1, u2, u3, u4, u5, u6, u7 = n0, n1, n2, n3, n4, n5, n6, n7
        else:
            w0, w1, w2, w3, w4, w5, w6, w7 = n0, n1, n2, n3, n4, n5, n6, n7
        s += NW
    tl.store(o_ptr + pid * 32 * NW + tid, acc)


def _pad_asm(programs_per_sm: int) -> str:
    """A static shared-memory block that limits an SM to ``programs_per_sm`` programs (48 KiB at most)."""
    size = min((227 * 1024) // programs_per_sm - 1024, 48 * 1024 - 16)
    return f".shared .align 16 .b8 qb_pad[{size}];\nmov.u32 $0, qb_pad;"


def _graph_us(fn, launches: int = 20, repeats: int = 20) -> float:
    """Median microseconds per launch: a CUDA graph of ``launches`` calls ``fn(i)``, replayed."""
    for i in range(2):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / launches)
    times.sort()
    return times[len(times) // 2]


def _layout(spec: str, n: int, k: int):
    """The engine's layout of one ``n x k`` product for ``spec`` (tiled as the engine stores it)."""
    from quantbench.engine.kernels.layouts import layout_for, plain_layout_for, tiling_for

    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    if spec == "bf16":
        return plain_layout_for(lin)
    model = torch.nn.Sequential(lin)
    quantbench.quantize(model, spec)
    module = model[0]
    tiles = tiling_for(module)
    if tiles:
        module.store_tiled(tiles)
    return layout_for(module)


def measure(spec: str, name: str, n: int, k: int, copy_gbps: float, repeats: int) -> list[dict]:
    """Rows for one product: the load-only kernel in three shapes (and cuBLAS for bf16 weights)."""
    dev = torch.device("cuda")
    layout = _layout(spec, n, k)
    cfg = _config(1, n, k, layout, dev)
    nbytes = layout.w32.numel() * 4
    programs = (n // 16) * cfg["SPLIT_K"]
    steps = nbytes // STEP // programs
    copies = max(3, -(-(768 << 20) // nbytes))
    bufs = [
        torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device=dev)
        for _ in range(copies)
    ]
    timings = []
    for nw, depth in ((4, 1), (4, 2), (8, 1)):
        out = torch.empty(programs * 32 * nw, dtype=torch.int32, device=dev)
        pad = _pad_asm(32 // nw)  # 32 warps per SM, as the GEMV's 8 programs of 4 warps

        def launch(i: int, out=out, nw=nw, depth=depth, pad=pad) -> None:
            _load_pattern_kernel[(programs,)](
                bufs[i % copies],
                out,
                steps,
                NW=nw,
                DEPTH=depth,
                LOAD_ASM=load_asm(4),
                PAD_ASM=pad,
                num_warps=nw,
            )

        timings.append((f"loads only, {nw} warps, {depth} ahead", _graph_us(launch, repeats=repeats)))
    if spec == "bf16":
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        weights = [b.view(torch.bfloat16).view(n, k) for b in bufs]
        timings.append(
            ("cuBLAS F.linear", _graph_us(lambda i: F.linear(x, weights[i % copies]), repeats=repeats))
        )
    rows = []
    for kernel, us in timings:
        rows.append({"method": spec, "product": name, "kernel": kernel, "programs": programs, "steps": steps,
                     "split_k": cfg["SPLIT_K"], "mbytes": round(nbytes / 1e6, 2), "us": round(us, 2),
                     "pct_copy": round(100 * nbytes / us / 1e3 / copy_gbps, 1)})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="int4:group=128;bf16", help="';'-separated (int4:group=128, bf16)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemv_load_pattern: needs a CUDA GPU")
    dev = torch.device("cuda")
    copy = measure_copy_bandwidth(dev)
    result = {"device": device_name(dev), "copy_gbps": round(copy, 1), "rows": []}
    print(f"{result['device']}: copy {copy:.0f} GB/s")
    print(
        f"{'method':16s} {'product':8s} {'kernel':26s} {'programs':>8s} {'MB':>7s} {'us':>7s} {'% copy':>7s}"
    )
    for spec in split_methods([args.methods]):
        shapes = dict(SHAPES, head=HEAD) if spec == "bf16" else SHAPES
        for name, (n, k) in shapes.items():
            for row in measure(spec, name, n, k, copy, args.repeats):
                result["rows"].append(row)
                print(f"{spec:16s} {name:8s} {row['kernel']:26s} {row['programs']:8d} {row['mbytes']:7.1f} "
                      f"{row['us']:7.2f} {row['pct_copy']:7.1f}", flush=True)  # fmt: skip
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
