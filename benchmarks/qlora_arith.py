"""QLoRA on the real model, CPU-sized: teach an arithmetic task on a frozen NF4 base.

Builds a synthetic task from local data only and measures held-out loss and exact-match accuracy
(greedy) of the NF4 base before and after training LoRA adapters, checks the base's 4-bit codes are
bit-identical afterwards, prints a table and writes JSON. Tasks:

* ``oplus`` (default): ``What is 82 ⊕ 45? Answer:`` -> `` 37``. The operator is unknown to the base
  (it guesses, 0% on our held-out set); the examples define it as subtraction, which the adapters must
  pick up from the data and apply to held-out pairs.
* ``add``: ``What is 37 + 45? Answer:`` -> `` 82`` (the base already does most of these).

    python benchmarks/qlora_arith.py --steps 30 --train 160 --heldout 30
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch

import quantbench
from quantbench.train import qlora
from quantbench.train.data import encode_example


def make_task(n: int, seed: int, task: str = "oplus") -> list[tuple[str, str]]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        if task == "add":
            items.append((f"What is {a} + {b}? Answer:", f" {a + b}"))
        else:
            a, b = max(a, b), min(a, b)
            items.append((f"What is {a} ⊕ {b}? Answer:", f" {a - b}"))
    return items


@torch.no_grad()
def accuracy(model, tokenizer, items: list[tuple[str, str]]) -> float:
    model.eval()
    correct = 0
    for prompt, answer in items:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        match = re.search(r"-?\d+", text)
        correct += bool(match) and match.group(0) == answer.strip()
    return correct / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=quantbench.DEFAULT_MODEL)
    parser.add_argument("--method", default="nf4:block=64,dq=1,compute=bf16")
    parser.add_argument("--task", choices=("oplus", "add"), default="oplus")
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--heldout", type=int, default=60)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--out", default="out/qlora-arith")
    parser.add_argument("--json", default="out/qlora-arith.json")
    args = parser.parse_args()

    model, tokenizer = quantbench.load_model(args.model, dtype="fp32")
    quantbench.quantize(model, args.method)
    train_items, held_items = make_task(args.train, 1, args.task), make_task(args.heldout, 2, args.task)
    train = [encode_example(p, c, tokenizer, 64) for p, c in train_items]
    held = [encode_example(p, c, tokenizer, 64) for p, c in held_items]
    before_codes = qlora.base_weight_tensors(model)
    # The base is frozen: keep each layer's dequantized weight instead of decoding it on every forward
    # and recompute (same numbers; the 4-bit codes stay the stored truth and are checked below).
    from quantbench.quant.apply import set_dequant_cache

    set_dequant_cache(model, True)
    peft_model = qlora.attach_lora(model, r=16, alpha=32, dropout=0.05)
    pad = tokenizer.pad_token_id or 0
    loss0, acc0 = (
        qlora.evaluate_loss(peft_model, held, pad_id=pad),
        accuracy(peft_model, tokenizer, held_items),
    )
    settings = qlora.TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=5,
        save_every=max(1, args.steps // 3),
    )
    start = time.perf_counter()
    record = qlora.train_lora(peft_model, train, settings, args.out, pad_id=pad)
    seconds = time.perf_counter() - start
    loss1, acc1 = (
        qlora.evaluate_loss(peft_model, held, pad_id=pad),
        accuracy(peft_model, tokenizer, held_items),
    )
    after_codes = qlora.base_weight_tensors(peft_model)
    unchanged = all(torch.equal(before_codes[k], after_codes[k]) for k in before_codes)
    qlora.save_adapter(peft_model, args.out, base=args.model, method=args.method)
    result = {
        "model": args.model,
        "task": args.task,
        "method": args.method,
        "steps": record.steps_done,
        "resumed_from": record.resumed_from,
        "train_examples": args.train,
        "heldout_examples": args.heldout,
        "heldout_loss_before": loss0,
        "heldout_loss_after": loss1,
        "heldout_accuracy_before": acc0,
        "heldout_accuracy_after": acc1,
        "peak_memory_gib": max(record.peak_memory_bytes) / 2**30,
        "memory_kind": record.memory_kind,
        "train_seconds": round(seconds, 1),
        "base_codes_bit_identical": unchanged,
    }
    print(f"{'':24}{'before':>10}{'after':>10}")
    print(f"{'held-out loss':24}{loss0:>10.4f}{loss1:>10.4f}")
    print(f"{'held-out accuracy':24}{acc0:>10.3f}{acc1:>10.3f}")
    print(
        f"steps {record.steps_done}, {seconds:.0f} s, peak {result['peak_memory_gib']:.2f} GiB ({record.memory_kind}), "
        f"base codes bit-identical: {unchanged}"
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
