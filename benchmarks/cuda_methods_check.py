"""Issue 2's GPU check: every registered method quantizes and runs on CUDA, and its outputs match the
CPU reference path.

On random-weight Mistral-7B (real layer shapes; 2 decoder layers so every method, calibrated ones
included, quantizes in seconds) for each method in ``quant.METHODS``:

1. per linear of both decoder layers, ``module(x)`` on CUDA (the method's CUDA path: Triton kernels
   via ``engine.kernels.dispatch``, ``torch._scaled_mm`` / ``torch._int_mm``, ...) against the same
   module moved to CPU (the pure-torch reference) on fresh random ``x [M, K]`` for M = 1, 8, 64;
   and, where a Triton layout exists, the engine's kernel (``engine.kernels.linear``) the same way;
2. the whole model: last-position logits on CUDA vs on CPU for 2 x 16 tokens;
3. the engine (CUDA-graph decode) generates 16 tokens at batch 2.

Bounds (relative Frobenius error): weight-only 1e-2 per linear; W8A8 methods (llm.int8, fp8,
smoothquant) 3e-2 per linear (activation quantization of bf16 inputs that differ by one rounding can
flip a code); logits 5e-2 (two layers of bf16 rounding differences), or, where the CPU reference itself
moves more than that under rounding-level changes, twice its largest move: the reference's logits with
every decoder layer's input moved by one bf16 unit in the last place at random, three times (activation
quantization turns a one-ulp input difference into a whole code step, fp8's e4m3 step being 2^5 times
bf16's, so CUDA and CPU cannot agree more closely than the reference agrees with itself).
``python benchmarks/cuda_methods_check.py [--json out.json]``; exit code 1 on a failure.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

import quantbench
from quantbench.quant import METHODS, QuantLinear

W8A8 = {"llm.int8", "fp8", "smoothquant"}
BASELINES = {"bf16", "fp16", "fp32"}
SPEC = {"llm.int8": "llm.int8:compute=bf16"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def ulp_jitter(module: torch.nn.Module, args: tuple, gen: torch.Generator) -> tuple:
    """A decoder layer's forward pre-hook: its hidden states moved by one bf16 ulp up or down at random."""
    h = args[0]
    step = torch.randint(0, 3, h.shape, generator=gen).to(h.dtype) - 1  # -1, 0, +1
    up = torch.nextafter(h, torch.full_like(h, float("inf")))
    down = torch.nextafter(h, torch.full_like(h, float("-inf")))
    return (torch.where(step > 0, up, torch.where(step < 0, down, h)), *args[1:])


def reference_spread(cpu_model: torch.nn.Module, ids: torch.Tensor, logits: torch.Tensor, runs: int = 3) -> float:
    """The largest relative change of the CPU reference's last-position logits over ``runs`` forwards with
    every decoder layer's input jittered by one ulp (``ulp_jitter``)."""
    import functools

    gen = torch.Generator().manual_seed(1)
    hooks = [
        layer.register_forward_pre_hook(functools.partial(ulp_jitter, gen=gen))
        for layer in cpu_model.model.layers
    ]
    try:
        with torch.no_grad():
            return max(rel(cpu_model(ids).logits[:, -1].float(), logits) for _ in range(runs))
    finally:
        for hook in hooks:
            hook.remove()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--methods", default="", help="comma list (default: every registered method)")
    args = ap.parse_args()
    names = [m for m in args.methods.split(",") if m] or list(METHODS)
    results = []
    ok_all = True
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 32000, (8, 256), generator=gen)
    ids = torch.randint(0, 32000, (2, 16), generator=gen)
    for name in names:
        spec = SPEC.get(name, name)
        t0 = time.perf_counter()
        row = {"method": name, "spec": spec}
        try:
            model = quantbench.random_model("mistral-7b", dtype="bf16", device="cuda", num_hidden_layers=2)
            kwargs = {"calib": calib.cuda()} if hasattr(METHODS[name], "quantize_model") else {}
            quantbench.quantize(model, spec, **kwargs)
            tol = 3e-2 if name in W8A8 else 1e-2
            worst, worst_kernel, kernel_layers = 0.0, 0.0, 0
            from quantbench.engine.kernels import layout_for, linear

            for lname, mod in model.named_modules():
                if not isinstance(mod, QuantLinear) or "layers." not in lname:
                    continue
                cpu_mod = copy.deepcopy(mod).cpu()
                layout = layout_for(mod)
                for m in (1, 8, 64):
                    x = torch.randn(m, mod.in_features, device="cuda").to(mod.compute_dtype)
                    ref = cpu_mod(x.cpu())
                    worst = max(worst, rel(mod(x), ref))
                    if layout is not None and (layout.act_quant == 0 or m <= 16):
                        worst_kernel = max(worst_kernel, rel(linear(layout, x), ref))
                kernel_layers += layout is not None
            row.update(layer_rel_err=worst, kernel_rel_err=worst_kernel, kernel_layers=kernel_layers, tol=tol)
            with torch.no_grad():
                gpu_logits = model(ids.cuda()).logits[:, -1].float()
                cpu_model = copy.deepcopy(model).cpu()
                cpu_logits = cpu_model(ids).logits[:, -1].float()
                row["reference_spread"] = reference_spread(cpu_model, ids, cpu_logits)
                del cpu_model
            row["logits_rel_err"] = rel(gpu_logits, cpu_logits)
            row["logits_tol"] = max(5e-2, 2 * row["reference_spread"])
            from quantbench.engine import Engine

            engine = Engine(model)
            out = engine.generate(ids.cuda(), max_new_tokens=16, ignore_eos=True)
            row["engine_path"] = engine.last_path
            row["engine_tokens"] = list(out.shape)
            row["ok"] = bool(worst < tol and worst_kernel < tol and row["logits_rel_err"] < row["logits_tol"])
        except Exception as exc:  # noqa: BLE001 - report and go on with the next method
            row["ok"] = False
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        row["seconds"] = round(time.perf_counter() - t0, 1)
        ok_all &= row["ok"]
        results.append(row)
        print(json.dumps(row), flush=True)
        model = None
        torch.cuda.empty_cache()
    print(f"\n{'method':12s} {'layer err':>10s} {'kernel err':>10s} {'logits err':>10s} {'bound':>9s}  ok  path")
    for r in results:
        print(
            f"{r['method']:12s} {r.get('layer_rel_err', float('nan')):10.2e} {r.get('kernel_rel_err', float('nan')):10.2e} "
            f"{r.get('logits_rel_err', float('nan')):10.2e} {r.get('logits_tol', float('nan')):9.2e}  "
            f"{'yes' if r['ok'] else 'NO '} "
            f"{r.get('engine_path', r.get('error', ''))}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, fh, indent=1)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
