"""Shared-prefix KV reuse on the real model: time per question with and without it, same answers.

    python benchmarks/eval_prefix_reuse.py [--model qwen2.5-coder-0.5b] [--method bf16] [--limit 10]
        [--subjects a,b] [--batch-size 16] [--json out.json]

Both runs start from an empty in-memory store, evaluate the same questions (MMLU val, 5-shot,
loglikelihood) and must give the same answers; the table shows wall time, time per question, model
forwards and tokens fed.
"""

from __future__ import annotations

import argparse
import json
import time

from quantbench.eval.harness import evaluate
from quantbench.eval.lm import HFLM
from quantbench.eval.loading import configure_threads, enable_dequant_cache, load_for_eval
from quantbench.eval.runner import QUICK_SUBJECTS


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--method", default="bf16")
    parser.add_argument("--task", default="mmlu")
    parser.add_argument("--subjects", default=None)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    threads = configure_threads(args.threads)
    model, tokenizer = load_for_eval(args.model, args.method, args.device)
    device = str(next(model.parameters()).device)
    enable_dequant_cache(model, device)
    subjects = args.subjects.split(",") if args.subjects else list(QUICK_SUBJECTS[args.task])
    rows = {}
    for name, reuse in (("prefix reuse", True), ("no reuse", False)):
        lm = HFLM(model, tokenizer, batch_size=args.batch_size, prefix_reuse=reuse)
        start = time.perf_counter()
        result = evaluate(
            model,
            tokenizer,
            args.task,
            subjects=subjects,
            limit=args.limit,
            shots=args.shots,
            batch_size=args.batch_size,
            prefix_reuse=reuse,
            lm=lm,
        )
        wall = time.perf_counter() - start
        rows[name] = {
            "wall_s": wall,
            "s_per_question": wall / result.questions,
            "questions": result.questions,
            "forwards": lm.calls,
            "tokens": lm.tokens,
            "accuracy": result.accuracy,
            "answers": [a.pred for a in result.answers],
            "logprobs": [a.logprobs for a in result.answers],
        }
    same = rows["prefix reuse"]["answers"] == rows["no reuse"]["answers"]
    a, b = rows["prefix reuse"], rows["no reuse"]
    differ = sum(x != y for x, y in zip(a["answers"], b["answers"], strict=True))
    max_diff = max(
        abs(x - y)
        for la, lb in zip(a["logprobs"], b["logprobs"], strict=True)
        for x, y in zip(la, lb, strict=True)
    )
    speedup = rows["no reuse"]["wall_s"] / rows["prefix reuse"]["wall_s"]
    print(
        f"{args.model} {model.quantbench_config.spec} on {device} ({threads} thread(s)); {args.task} val "
        f"{args.shots}-shot, subjects {', '.join(subjects)}, {args.limit} each, batch {args.batch_size}"
    )
    print(f"{'':14} {'wall s':>8} {'s/question':>11} {'forwards':>9} {'tokens':>8} {'Avg %':>6}")
    for name, row in rows.items():
        print(
            f"{name:14} {row['wall_s']:8.1f} {row['s_per_question']:11.2f} {row['forwards']:9d} "
            f"{row['tokens']:8d} {100 * row['accuracy']:6.1f}"
        )
    print(
        f"speedup {speedup:.2f}x; answers differing: {differ}/{a['questions']}, max |d logprob| {max_diff:.2e}"
    )
    if args.json:
        payload = {
            "model": args.model,
            "spec": model.quantbench_config.spec,
            "device": device,
            "threads": threads,
            "subjects": subjects,
            "limit": args.limit,
            "shots": args.shots,
            "batch_size": args.batch_size,
            "runs": rows,
            "speedup": speedup,
            "identical_answers": same,
        }
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=2)


if __name__ == "__main__":
    main()
