"""``quantbench finetune``: QLoRA on a quantized base."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer
from rich.console import Console

from quantbench.cli import app

console = Console()


@app.command()
def finetune(
    base: str = typer.Argument("default", help="packaged model name, HF directory or .gguf file"),
    method: str = typer.Option(
        "nf4:dq=1,compute=bf16", "--method", "-m", help="quantization of the frozen base"
    ),
    data: Path = typer.Option(None, "--data", help="JSONL of {prompt, completion} or {messages}"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (adapter + checkpoints)"),
    eval_data: Path = typer.Option(None, "--eval-data", help="held-out JSONL: loss before and after"),
    lora_r: int = typer.Option(16, "--lora-r"),
    lora_alpha: float = typer.Option(32, "--lora-alpha"),
    lora_dropout: float = typer.Option(0.05, "--lora-dropout"),
    target: str = typer.Option("q,k,v,o,gate,up,down", "--target", help="layers that get adapters"),
    steps: int = typer.Option(100, "--steps"),
    batch_size: int = typer.Option(4, "--batch-size"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    lr: float = typer.Option(2e-4, "--lr"),
    warmup: int = typer.Option(5, "--warmup", help="linear warm-up steps before the cosine decay"),
    max_length: int = typer.Option(1024, "--max-length"),
    save_every: int = typer.Option(50, "--save-every", help="checkpoint every N steps (0: never)"),
    seed: int = typer.Option(0, "--seed"),
    no_grad_checkpointing: bool = typer.Option(False, "--no-grad-checkpointing"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    merge_and_quantize: str = typer.Option(
        None,
        "--merge-and-quantize",
        help="after training, merge into a bf16 base and quantize with this spec",
    ),
) -> None:
    """Train LoRA adapters on a frozen quantized BASE; resumes from OUT's last checkpoint."""
    from quantbench import load_model, parse_spec, quantize
    from quantbench.train import qlora
    from quantbench.train.data import load_examples

    qlora.require_peft()  # the `train` extra
    config = parse_spec(method)
    if merge_and_quantize:
        parse_spec(merge_and_quantize)
    if data is None:
        raise typer.BadParameter("--data is required")
    qlora.check_settings(
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup=warmup,
        max_length=max_length,
        save_every=save_every,
        lora_r=lora_r,
        lora_dropout=lora_dropout,
    )
    for path, option in ((data, "--data"), (eval_data, "--eval-data")):
        if path is not None and not path.is_file():
            raise qlora.FinetuneError(f"{option} {path} is not a file")
    qlora.check_out_dir(out, base)
    model, tokenizer = load_model(base, dtype="fp32", device=device)
    examples = load_examples(data, tokenizer, max_length)
    held_out = load_examples(eval_data, tokenizer, max_length) if eval_data else None
    quantize(model, config)
    before_weights = qlora.base_weight_tensors(model)
    peft_model = qlora.attach_lora(model, lora_r, lora_alpha, lora_dropout, target)
    pad = tokenizer.pad_token_id or 0
    loss_before = qlora.evaluate_loss(peft_model, held_out, pad_id=pad) if held_out else None
    settings = qlora.TrainSettings(
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup_steps=warmup,
        save_every=save_every,
        seed=seed,
        gradient_checkpointing=not no_grad_checkpointing,
    )
    record = qlora.train_lora(peft_model, examples, settings, out, pad_id=pad)
    loss_after = qlora.evaluate_loss(peft_model, held_out, pad_id=pad) if held_out else None
    unchanged = all(
        torch.equal(v, before_weights[k]) for k, v in qlora.base_weight_tensors(peft_model).items()
    )
    summary = {
        "base": base,
        "method": config.spec,
        "examples": len(examples),
        "steps": record.steps_done,
        "resumed_from": record.resumed_from,
        "first_loss": record.losses[0] if record.losses else None,
        "last_loss": record.losses[-1] if record.losses else None,
        "heldout_loss_before": loss_before,
        "heldout_loss_after": loss_after,
        "peak_memory_gib": max(record.peak_memory_bytes, default=0) / 2**30,
        "memory_kind": record.memory_kind,
        "train_seconds": round(record.seconds, 1),
        "base_weights_unchanged": unchanged,
        "lora": {
            "r": lora_r,
            "alpha": lora_alpha,
            "dropout": lora_dropout,
            "target": qlora.resolve_targets(target),
        },
    }
    qlora.save_adapter(peft_model, out, base=base, method=config.spec, extra={"training": summary})
    console.print_json(json.dumps(summary))
    if merge_and_quantize:
        merged_dir = out / "merged"
        qlora.merge_and_quantize(out, merge_and_quantize, merged_dir)
        console.print(f"merged + quantized ({merge_and_quantize}) -> {merged_dir}")
