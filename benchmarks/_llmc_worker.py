"""Run llm-compressor's oneshot in its own interpreter (see vs_llmcompressor.py for the venv).

usage: _llmc_worker.py NAME MODEL_DIR CALIB_IDS.pt OUT.safetensors

Loads the float32 model from MODEL_DIR, calibrates on the exact token ids in CALIB_IDS.pt, and writes
every parameter with the quantized Linears' weights replaced by their fake-quantized values (what
llm-compressor's own forward computes). Prints one JSON line: timing and versions.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def recipe(name: str) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if name == "llmc-gptq":
        return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])]
    if name == "llmc-gptq-asym":
        return [GPTQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"])]
    if name == "llmc-awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [
            AWQModifier(),
            QuantizationModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"]),
        ]
    raise SystemExit(f"unknown row {name}")


def fake_quantized_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    out: dict[str, torch.Tensor] = {}
    quantized = 0
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if isinstance(module, torch.nn.Linear) and scheme is not None and scheme.weights is not None:
            g_idx = getattr(module, "weight_g_idx", None)
            if g_idx is not None and not torch.equal(
                g_idx.long(), torch.arange(g_idx.numel()) // scheme.weights.group_size
            ):
                raise SystemExit(f"{name}: non-trivial g_idx (actorder=group) is not handled here")
            w = fake_quantize(
                module.weight.detach(),
                module.weight_scale.detach(),
                getattr(module, "weight_zero_point", None),
                scheme.weights,
            )
            out[f"{name}.weight"] = w.float().contiguous()
            if module.bias is not None:
                out[f"{name}.bias"] = module.bias.detach().float().contiguous()
            quantized += 1
    for key, value in model.state_dict().items():
        if key in out or key.endswith(("weight_scale", "weight_zero_point", "weight_g_idx")):
            continue
        if "lm_head" in key and getattr(model.config, "tie_word_embeddings", False):
            continue
        out[key] = value.detach().float().contiguous()
    print(f"{quantized} Linears fake-quantized", file=sys.stderr)
    return out


def main() -> None:
    name, model_dir, ids_path, out_path = sys.argv[1:5]
    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its activation cache unconditionally ("Cannot access
        # accelerator device when none is available" on a CPU-only machine). Pinning only speeds up
        # host-to-GPU copies, so skipping it on a CPU changes no result.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    ids: torch.Tensor = torch.load(ids_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    start, cpu_start = time.perf_counter(), time.process_time()
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe(name),
        max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0],
        shuffle_calibration_samples=False,
    )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    save_file(fake_quantized_weights(model), out_path)
    print(
        json.dumps(
            {
                "quantize_s": round(seconds, 1),
                "quantize_cpu_s": round(cpu_seconds, 1),
                "version": llmcompressor.__version__,
                "compressed_tensors": compressed_tensors.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
