"""llm-compressor's own checkpoints of a model, imported as quantbench checkpoints (the two checkpoint rows of
``docs/results/seed-table.yaml``).

    pip install -e ".[peers-ct]"        # llm-compressor 0.14 and compressed-tensors (their own environment)
    python examples/llmcompressor_checkpoints.py --out lc

For each scheme, llm-compressor's ``oneshot`` runs on the model in bf16 with quantbench's calibration
windows (``--calib``, as quantbench's own calibrated methods draw them on this machine), writes its
compressed-tensors directory ``OUT/lc-SCHEME``, and ``quantbench import`` turns it into ``OUT/qb-SCHEME``:

* ``w4a16``: GPTQ, int4 weights in groups of 128, symmetric (llm-compressor's W4A16 preset), lm_head kept;
* ``w8a8``: SmoothQuant (strength 0.8) then GPTQ with the W8A8 preset (int8 weights per channel, int8
  activations per token, dynamic), lm_head kept.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

SCHEMES = ("w4a16", "w8a8")


def recipe(scheme: str) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    if scheme == "w4a16":
        return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])]
    return [
        SmoothQuantModifier(smoothing_strength=0.8),
        GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="quantbench model spec (default: the packaged default)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--calib", default="corpus", help="quantbench calibration spec, SOURCE[:NxL]")
    args = parser.parse_args()
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise SystemExit(f"error: unknown scheme(s) {', '.join(unknown)}; known: {', '.join(SCHEMES)}")

    from datasets import Dataset
    from llmcompressor import oneshot

    import quantbench
    from quantbench.checkpoint_export import import_checkpoint
    from quantbench.quant.calib import prepare_calibration

    spec = args.model or quantbench.DEFAULT_MODEL
    args.out.mkdir(parents=True, exist_ok=True)
    for scheme in schemes:
        model, tokenizer = quantbench.load_model(spec, dtype="bf16")
        ids = prepare_calibration(args.calib, model, tokenizer).input_ids
        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        lc_dir, qb_dir = args.out / f"lc-{scheme}", args.out / f"qb-{scheme}"
        t0 = time.perf_counter()
        oneshot(
            model=model,
            dataset=data,
            recipe=recipe(scheme),
            num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1],
            output_dir=str(lc_dir),
        )
        tokenizer.save_pretrained(lc_dir)
        seconds = time.perf_counter() - t0
        import_checkpoint(lc_dir, qb_dir, overwrite=True)
        print(f"{scheme}: llm-compressor {seconds:.1f}s on {ids.shape[0]}x{ids.shape[1]} tokens -> {qb_dir}")


if __name__ == "__main__":
    main()
