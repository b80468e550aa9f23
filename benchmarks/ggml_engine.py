"""Engine decode speed of llama.cpp formats beside bf16 and int4 g128 on a random-weight model (needs CUDA).

    python benchmarks/ggml_engine.py [--shape qwen2.5-7b] [--methods "bf16;int4:group=128;q8_0;q4_0;q4_k_m;q6_k"]
        [--batch 1] [--input 128] [--output 128] [--repeats 3] [--json out.json]

Per method a random-weight model of the shape is built on the GPU (Qwen2.5-7B's by default;
``qwen2.5-1.5b`` and ``tiny`` for quick runs). llama.cpp methods get random blocks
(``quantbench.quant.ggml.random_blocks``: whole blocks drawn from a pool of quantized random blocks, the
layer types of a mix chosen as llama-quantize does), since the k-quant quantizers run on the CPU at
seconds per million weights; int4 is quantized by RTN on the GPU; bf16 stays as it is. Every Linear is
quantized except ``lm_head`` for the single-type methods (their default ``skip``); q4_k_m quantizes it too
(Q6_K), as llama-quantize does.

Per method and batch: ms per decode token (``Engine``, CUDA-graph decode, median of ``--repeats`` after one
warm-up generation of ``--input`` prompt + ``--output`` new tokens), first-token ms, the bytes one decode
step reads (each layer in the form the kernels read: for llama.cpp formats the converted copy, see
``engine/kernels/ggml_layout.py``, not the blocks) and those bytes per decode time as a share of the
measured copy bandwidth (read + write, as ``quantbench bench`` reports it).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

import torch
from torch import nn

import quantbench
from quantbench.bench.runner import device_name, measure_copy_bandwidth, split_methods
from quantbench.engine import Engine
from quantbench.quant import METHODS, parse_spec
from quantbench.quant.apply import eligible_linears, replace_with_empty
from quantbench.quant.ggml import GGMLLinear, random_blocks

# Qwen2.5 shapes over the packaged qwen2 config (the architecture of the default real model)
SHAPES = {
    "qwen2.5-7b": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False,
    ),
}  # fmt: skip


def build(shape: str, spec: str, seed: int = 0) -> nn.Module:
    """A random model of ``shape`` on the GPU with ``spec`` applied (see the module docstring)."""
    torch.manual_seed(seed)
    model = quantbench.random_model("qwen2.5-0.5b", dtype="bf16", device="cuda", seed=seed, **SHAPES[shape])
    config = parse_spec(spec)
    if METHODS[config.method].linear_cls is not GGMLLinear:
        return quantbench.quantize(model, config)
    names = [name for name, _, reason in eligible_linears(model, config) if reason is None]
    biases = {name: model.get_submodule(name).bias for name in names}
    replace_with_empty(model, config, names)
    for i, name in enumerate(names):
        module = model.get_submodule(name)
        with torch.no_grad():
            blocks = random_blocks(module.ggml_type, module.out_features, module.in_features, seed=seed + i)
            module.blocks.copy_(blocks)
            if biases[name] is not None:
                module.bias.copy_(biases[name])
    model.quantbench_config = config
    return model


def step_bytes(engine: Engine) -> int:
    """Bytes of weights one decode step reads, each linear in the form its kernel reads."""
    em = engine.em
    total = em.norm_w.numel() * em.norm_w.element_size()
    ops = [em.lm_head, *(op for layer in em.layers for op in (layer.qkv, layer.o, layer.gate_up, layer.down))]
    for op in ops:
        for module, layout in zip(op.modules, op.layouts, strict=True):
            if layout is not None:
                total += layout.weight_bytes
            else:
                tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
                total += sum(t.numel() * t.element_size() for t in tensors)
    for layer in em.layers:
        total += (layer.ln1.numel() + layer.ln2.numel()) * layer.ln1.element_size()
    return total


def time_method(model: nn.Module, batches: list[int], args) -> dict:
    from engine_ab import time_engine  # the A/B runs' timing (benchmarks/ is this script's path)

    engine = Engine(model)
    return {"step_gib": round(step_bytes(engine) / 2**30, 3), **time_engine(engine, batches, args)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-7b", choices=sorted(SHAPES))
    ap.add_argument("--methods", default="bf16;int4:group=128;q8_0;q4_0;q4_k_m;q6_k")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--input", type=int, default=128)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ggml_engine: needs a CUDA GPU")
    batches = [int(b) for b in args.batch.split(",")]
    dev = torch.device("cuda")
    result = {"device": device_name(dev), "shape": args.shape, "input": args.input, "output": args.output,
              "repeats": args.repeats, "copy_gbps": round(measure_copy_bandwidth(dev), 1), "rows": []}  # fmt: skip
    print(f"{result['device']}: copy {result['copy_gbps']:.0f} GB/s, shape {args.shape}", flush=True)
    header = f"{'method':22s} {'compute':8s} {'GiB/step':>9s}" + "".join(
        f" {'b' + str(b) + ' ms/tok':>12s} {'first ms':>9s} {'% copy':>7s}" for b in batches
    )
    print(header, flush=True)
    for spec in split_methods([args.methods]):
        model = build(args.shape, spec)
        row = {"method": spec, "compute": str(next(model.parameters()).dtype).replace("torch.", "")}
        row.update(time_method(model, batches, args))
        result["rows"].append(row)
        cells = ""
        for b in batches:
            ms = row[f"b{b}"]["per_token_ms"]
            share = (
                100 * row["step_gib"] * 2**30 / (ms * 1e-3) / (result["copy_gbps"] * 1e9)
            )  # as bench.runner
            cells += f" {ms:12.3f} {row[f'b{b}']['first_token_ms']:9.2f} {share:6.0f}%"
        print(f"{spec:22s} {row['compute']:8s} {row['step_gib']:9.3f}{cells}", flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
        del model
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
