"""Perplexity and time of our calibrated methods against RTN, bf16 and llm-compressor, on the real model.

Every row quantizes a fresh copy of the model, then measures perplexity on the corpus' *evaluation*
slice (``kjv-eval``) while calibration windows come from the disjoint *calibration* slice
(``kjv-calib``); all rows get the same calibration token ids and the same evaluation tokens.

llm-compressor is a benchmark-only peer, never a dependency. It pins an older transformers, so it
lives in its own venv that shares this venv's torch (nothing in /work/venv is replaced)::

    python3.11 -m venv /work/llmc-venv
    echo /work/venv/lib/python3.11/site-packages > /work/llmc-venv/lib/python3.11/site-packages/zz_main.pth
    /work/llmc-venv/bin/pip install --no-deps -c /tmp/constraints.txt llmcompressor==0.14.0.1 \\
        compressed-tensors==0.19.0 transformers==5.17.0 huggingface_hub==1.33.0 datasets==5.2.0 loguru ...

The ``llmc-*`` rows run ``benchmarks/_llmc_worker.py`` with that interpreter (``--llmc-python``): it
runs ``oneshot`` on the same calibration ids and writes the fake-quantized weights, which this
script loads into the model and evaluates exactly like our rows (bf16 compute).

    python benchmarks/vs_llmcompressor.py --json bench_calibrated.json
    python benchmarks/vs_llmcompressor.py --methods gptq,llmc-gptq --calib corpus:16x512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import quantbench
from quantbench.eval import evaluation_text, perplexity
from quantbench.models import resolve_model_dir
from quantbench.quant.calib import prepare_calibration

HERE = Path(__file__).resolve().parent
DEFAULT_METHODS = [
    "bf16",
    "int4:group=128",
    "int4:group=128,asym",
    "awq:bits=4,group=128",
    "smoothquant:alpha=0.5",
    "gptq:bits=4,group=128,act_order=1,static_groups=1",
    "llmc-gptq",
    "llmc-awq",
]
LLMC = {
    "llmc-gptq": "GPTQ W4A16 (sym, group 128)",
    "llmc-gptq-asym": "GPTQ W4A16_ASYM (group 128)",
    "llmc-awq": "AWQ W4A16_ASYM (group 128)",
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_llmc(
    name: str, model_name: str, ids: torch.Tensor, python: str
) -> tuple[torch.nn.Module, float, str]:
    """Quantize with llm-compressor in its own interpreter; return our model with its weights."""
    model, _ = quantbench.load_model(model_name, dtype="fp32")
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = Path(tmp) / "calib_ids.pt"
        out_path = Path(tmp) / "weights.safetensors"
        torch.save(ids, ids_path)
        cmd = [
            python,
            str(HERE / "_llmc_worker.py"),
            name,
            str(resolve_model_dir(model_name)),
            str(ids_path),
            str(out_path),
        ]
        start = time.perf_counter()
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
            raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n" + "\n".join(tail))
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        from safetensors.torch import load_file

        weights = load_file(str(out_path))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise RuntimeError(f"{name}: unexpected tensors {unexpected[:3]}")
    model.to(torch.bfloat16)  # the same compute dtype as our quantized rows
    return (
        model,
        info.get("quantize_s", seconds),
        info.get("quantize_cpu_s", float("nan")),
        info.get("version", "?"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="';'- or ','-separated rows")
    parser.add_argument(
        "--calib", default="corpus", help="calibration spec (default: scaled to this machine)"
    )
    parser.add_argument("--eval-tokens", type=int, default=8192, help="evaluation tokens (kjv-eval)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--llmc-python", default=os.environ.get("LLMC_PYTHON", "/work/llmc-venv/bin/python"))
    parser.add_argument("--json", type=Path, default=HERE / "vs_llmcompressor.json")
    args = parser.parse_args()

    methods = _split_methods(args.methods)
    model, tok = quantbench.load_model(args.model, dtype="fp32")
    calib = prepare_calibration(args.calib, model, tok)
    for note in calib.notes:
        _log(note)
    _log(f"calibration: {calib.describe()}")
    eval_ids = tok(evaluation_text(), return_tensors="pt").input_ids[0][: args.eval_tokens]
    del model
    rows = []
    for spec in methods:
        _log(f"--- {spec}")
        try:
            if spec in LLMC:
                qmodel, seconds, cpu_s, version = run_llmc(
                    spec, args.model, calib.input_ids, args.llmc_python
                )
                label = f"{spec} ({LLMC[spec]}, llmcompressor {version})"
            else:
                qmodel, _ = quantbench.load_model(args.model, dtype="fp32")
                start, cpu_start = time.perf_counter(), time.process_time()
                quantbench.quantize(qmodel, spec, calib=calib, tokenizer=tok, log=_log)
                seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
                label = qmodel.quantbench_config.spec
        except Exception as exc:  # report and go on with the other rows
            _log(f"{spec}: FAILED: {exc}")
            rows.append({"method": spec, "error": str(exc)})
            continue
        result = perplexity(qmodel, tok, eval_ids, ctx=args.ctx, stride=args.ctx)
        rows.append(
            {
                "method": spec,
                "spec": label,
                "ppl": result.ppl,
                "quantize_s": round(seconds, 1),
                "quantize_cpu_s": round(cpu_s, 1),  # CPU seconds: comparable on a shared machine
                "eval": result.to_dict(),
            }
        )
        _log(f"{spec}: ppl {result.ppl:.4f}, quantize {seconds:.1f}s, eval {result.seconds:.1f}s")
        del qmodel
        _write(args, calib, rows)
    _print_table(rows)
    _write(args, calib, rows)


def _split_methods(text: str) -> list[str]:
    # Specs contain commas; rows are separated by ';' or by a ',' before a known method name.
    if ";" in text:
        return [m.strip() for m in text.split(";") if m.strip()]
    names = set(quantbench.METHODS) | set(LLMC)
    rows: list[str] = []
    for part in text.split(","):
        head = part.split(":")[0].strip()
        if head in names or not rows:
            rows.append(part.strip())
        else:
            rows[-1] += "," + part.strip()
    return rows


def _write(args: argparse.Namespace, calib, rows: list[dict]) -> None:
    base = next((r["ppl"] for r in rows if r.get("method") == "bf16" and "ppl" in r), None)
    for r in rows:
        if base and "ppl" in r:
            r["vs_bf16_pct"] = round(100 * (r["ppl"] / base - 1), 3)
    payload = {
        "model": args.model,
        "calibration": calib.to_dict(),
        "eval": {"corpus": "kjv-eval", "tokens": args.eval_tokens, "ctx": args.ctx, "stride": args.ctx},
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    args.json.write_text(json.dumps(payload, indent=2) + "\n")


def _print_table(rows: list[dict]) -> None:
    print(f"{'method':<34} {'ppl':>9} {'vs bf16':>8} {'quantize s':>11}")
    for r in rows:
        if "ppl" in r:
            pct = f"{r.get('vs_bf16_pct', 0):+.2f}%" if "vs_bf16_pct" in r else "-"
            print(f"{r['method']:<34} {r['ppl']:>9.4f} {pct:>8} {r['quantize_s']:>11.1f}")
        else:
            print(f"{r['method']:<34} {'failed':>9}  {r['error'].splitlines()[0][:80]}")


if __name__ == "__main__":
    main()
