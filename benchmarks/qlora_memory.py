"""QLoRA memory on a GPU: random-weight 7B architecture, NF4 (double quant) base, LoRA r=16 on all
projections, sequence 1024, batch 4, gradient checkpointing. Prints peak GPU memory per step and writes JSON.

    python benchmarks/qlora_memory.py --arch mistral-7b --steps 3 --json out/qlora_memory.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import quantbench
from quantbench.train import qlora
from quantbench.train.data import Example


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mistral-7b")
    parser.add_argument("--method", default="nf4:block=64,dq=1,compute=bf16")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    parser.add_argument("--json", default="out/qlora_memory.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    t0 = time.perf_counter()
    model = quantbench.random_model(args.arch, dtype="bf16", device="cuda", **overrides)
    quantbench.quantize(model, args.method)  # bf16 Linears are freed as each layer is replaced
    torch.cuda.empty_cache()
    build_s = time.perf_counter() - t0
    weights_gib = quantbench.weight_report(model).model_bytes / 2**30
    peft_model = qlora.attach_lora(model, r=16, alpha=32, dropout=0.05)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    examples = []
    for _ in range(args.batch * args.steps):
        ids = torch.randint(0, vocab, (args.seq,), generator=gen).tolist()
        examples.append(Example(ids, [-100] * (args.seq // 2) + ids[args.seq // 2 :]))
    settings = qlora.TrainSettings(
        steps=args.steps, batch_size=args.batch, lr=1e-4, warmup_steps=1, save_every=0
    )
    record = qlora.train_lora(
        peft_model, examples, settings, "out/qlora_memory_ckpt", resume=False, progress=False
    )
    result = {
        "device": torch.cuda.get_device_name(),
        "arch": args.arch,
        "layers": model.config.num_hidden_layers,
        "method": args.method,
        "seq": args.seq,
        "batch": args.batch,
        "weights_gib": round(weights_gib, 3),
        "peak_gib_per_step": [round(b / 2**30, 3) for b in record.peak_memory_bytes],
        "loss_per_step": [round(x, 4) for x in record.losses],
        "seconds_per_step": round(record.seconds / max(1, record.steps_done), 2),
        "build_and_quantize_s": round(build_s, 1),
    }
    print(json.dumps(result, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
