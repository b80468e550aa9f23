"""A/B timing of the engine's options on one quantized model per method (needs a CUDA GPU).

    python benchmarks/engine_ab.py --methods "int4:group=128;nf4:block=64" --variants "base;nopdl" --json ab.json

Each method quantizes one random-weight model once; each variant then builds a fresh ``Engine`` on it
(new CUDA graphs) with its ``EngineOptions`` (``VARIANTS``: the fields it changes), and times ``generate`` (``--input`` prompt + ``--output`` new
tokens) at each batch size: median of ``--repeats`` after one warm-up. Variants:

* ``base``: everything on;
* ``notile``: quantized codes stay row-major (list it first: the model keeps the first engine's storage);
* ``nopdl``: kernels launched without programmatic dependent launch (``kernels/pdl.py``);
* ``noh2``: batch 1 through ``wq_matmul``'s fp32 path instead of the half2 GEMV;
* ``nodense``: prompts through ``wq_matmul`` instead of the fused prompt GEMM / slabs;
* ``slab``: prompts through dequantized L2 slabs + cuBLAS instead of the fused prompt GEMM;
* ``actwide``: W8A8 prompt activations quantized with the decode's statistics tiles (1024 columns x 64
  tokens per program) instead of 256 x 16;
* ``colmax``: LLM.int8 prompt activations with statistics per 256 columns x 16 tokens after a
  column-maxima pass, instead of 64 columns x all tokens in one load;
* ``actpdl``: prompt-sized activation quantization launched with programmatic dependent launch;
* ``lut0`` / ``lut8`` / ``lut16`` / ``lut32``: NF4 / FP4 tensor-core GEMV decoding with byte permutes / a shared
  pair table of 8, 16 or 32 copies (``mma_lut_copies``);
* ``depth2``: 4-bit tensor-core GEMVs keep two steps of codes in flight instead of one;
* ``perm1`` / ``perm2`` / ``perm4``: with the shared pair table, that many code words of each NF4 / FP4 step
  decoded by byte permutes instead (ALU against the L1 data pipe);
* ``w8lut32`` / ``w8lut32p0``: NF4 / FP4 tensor-core GEMV programs of 8 warps with a 32-copy pair table
  (conflict-free lookups), with one / no permuted word per step;
* ``nosubs``: NF4 / FP4 tensor-core GEMV steps of one quantization group instead of two;
* ``noxcarry`` / ``xcarry``: no tensor-core GEMV loads its step's activations an iteration ahead / all do
  (default: 4-bit and e4m3 codes, ``mma_x_carry``);
* ``noattsplit``: decode attention one program per (sequence, kv head), the cache not split;
* ``attblk64`` / ``attblk128`` / ``attw16``: decode attention in blocks of at most 64 / 128 positions (256 by
  default), or 16 warps per 256-position block (8 by default);
* ``attmin64`` / ``attmin128``: decode attention splits the cache from 64 / 128 positions per split (512 by
  default);
* ``nopartials``: every decode GEMV sums its split-K partials itself (a fenced counter elects the last split)
  instead of leaving them to the next kernel (``kernels/partials.py``);
* ``nopick``: the greedy step's argmax and token writes as torch ops instead of one Triton kernel;
* ``loadonly``: (timing only: the tokens are wrong) tensor-core GEMV steps that load their codes and
  activations but decode and multiply nothing: the bound a faster decoder could reach in whole decode steps
  (``gemv_load_pattern.py`` measures it per product);
* ``cublas`` / ``plainall``: plain bf16 / fp16 linears through cuBLAS only / through the tensor-core GEMV at
  every size and 1-16 tokens (default, ``plain_*``: products of at most 8192 outputs at one token);
* ``noover``: (slab path) prompt slabs dequantized on the main stream (no overlap with the products);
* ``slab12`` / ``slab48``: the slab path with 12 / 48 MiB slabs instead of 24;
* ``l2eager``: eagerly launched prompt-sized products (evaluation) on L2 slabs instead of the whole weight;
* ``actpasses``: W8A8 activation quantization of long prompts by the statistics and apply programs
  instead of one whole-row program per token (``act_rows_min_m``);
* ``colmaxpass``: LLM.int8 prompts find their outlier columns by a column-maxima pass over each product's
  input instead of RMSNorm / SiLU-gate recording them as they write it (``act_producer_colmax`` off);
* ``postscale``: slab products of the exact codes, the per-row scales and W8A8 per-token factors applied
  in one more pass over the output (``slab_fold_scales`` off);
* ``fp8exact``: fp8 products of many tokens with the codes widened to fp16 (exact products, fp32 sums)
  instead of on e4m3 tensor cores (whose sums keep about 14 bits; ``w8a8_fp8_mma`` "fp16");
* ``w8a8slabs``: SmoothQuant, fp8 and LLM.int8-without-outliers products of ``act_rows_min_m`` tokens
  and more on dequantized slabs + cuBLAS instead of 8-bit tensor cores (``kernels/w8a8_gemm.py``;
  ``w8a8_gemm`` empty);
* ``refext``: extend forwards' attention (evaluation) by the reference ops (torch RoPE, the past gathered and
  concatenated, SDPA under a mask) instead of the Triton extend-attention kernel;
* ``nomma``: batches 1-16 through the half2 GEMV / ``wq_matmul`` instead of the tensor-core GEMV (the
  codes keep the tiles the first variant's engine chose: put it first to time the older engine);
* ``mmab1off``: the tensor-core GEMV for batches 2-16 only (where the codes' tiles hold whole steps of it);
* ``actall`` / ``actnone``: every / no W8A8 kind quantizes one token inside the GEMV (default: e4m3);
* ``cfg:KEY=V,...``: the half2 GEMV with launch-config keys replaced (``h2_config_edit``);
* ``mcfg:NW=8,DEPTH=2,split=2``: the tensor-core GEMV with launch keys replaced / its split multiplied
  (``mma_config_edit``).

``--ncu`` instead runs 6 eager decode steps of the first method with the first variant's options and
exits: the target for ``ncu --clock-control none -k regex:gemv_h2 ...`` (the kernels in their real
sequence; ``--variants nopdl`` for kernels that do not overlap).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import quantbench
from quantbench.bench.runner import device_name, measure_copy_bandwidth, split_methods
from quantbench.engine import Engine, EngineOptions
from quantbench.engine.options import ACT_QUANT_NAMES, DECODER_NAMES

SLABS = {"prompt_kernel": "slabs"}
# variant -> the EngineOptions fields it changes (every other field keeps its default)
VARIANTS: dict[str, dict] = {
    "base": {},
    "notile": {"tile": False},
    "nopdl": {"pdl": False},
    "noh2": {"h2": False},
    "nomma": {"mma": False},
    "mmab1off": {"mma_batch1": False},
    "actall": {"mma_quantizes": frozenset(ACT_QUANT_NAMES)},
    "actnone": {"mma_quantizes": frozenset()},
    "nodense": {"prompt_kernel": "wq_matmul"},
    "slab": SLABS,
    "noover": {**SLABS, "slab_overlap": False},
    "noattsplit": {"attn_split": False},
    "attblk64": {"attn_block": 64},
    "attblk128": {"attn_block": 128},
    "attw16": {"attn_warps": 16},
    "attmin64": {"attn_split_min": 64},
    "attmin128": {"attn_split_min": 128},
    "nopartials": {"partials": False},
    "nopick": {"greedy_pick": False},
    "cublas": {"plain_mma": False},
    "plainall": {"plain_max_out": 0, "plain_max_m": 16},
    "actwide": {"act_tiles_prompt": (1024, 64, 16, 1024)},
    "colmax": {"act_tiles_outlier": (256, 16, 16, 1024)},
    "actpdl": {"act_prompt_pdl": True},
    "actpasses": {"act_rows_min_m": 0},
    "colmaxpass": {"act_producer_colmax": False},
    "postscale": {"slab_fold_scales": False},
    "fp8exact": {"w8a8_fp8_mma": "fp16"},
    "w8a8slabs": {"w8a8_gemm": frozenset()},
    "noxcarry": {"mma_x_carry": frozenset()},
    "xcarry": {"mma_x_carry": frozenset(DECODER_NAMES)},
    "lut0": {"mma_lut_copies": 0},
    "lut8": {"mma_lut_copies": 8},
    "lut16": {"mma_lut_copies": 16},
    "lut32": {"mma_lut_copies": 32},
    "nosubs": {"mma_two_groups": False},
    "w8lut32": {"mma_table_warps": 8, "mma_lut_copies": 32},
    "w8lut32p0": {"mma_table_warps": 8, "mma_lut_copies": 32, "mma_lut_permute": 0},
    "perm1": {"mma_lut_permute": 1},
    "perm2": {"mma_lut_permute": 2},
    "perm4": {"mma_lut_permute": 4},
    "depth2": {"mma_depth_4bit": 2},
    "slab12": {**SLABS, "slab_elems": 6 << 20},
    "slab48": {**SLABS, "slab_elems": 24 << 20},
    "l2eager": {"eager_slab_elems": 0},
    "refext": {"extend_triton": False},
}


def _load_only_step(*args, **kwargs) -> str:
    """A tensor-core GEMV step that decodes and multiplies nothing: its code and activation words are only
    XORed into one output (so their loads stay), the others zero (``loadonly``: timing only, wrong tokens)."""
    words = [f"${i}" for i in range(8, 16)] + [f"${i}" for i in range(32, 48)]
    lines = ["{", ".reg .b32 t;", f"xor.b32 t, {words[0]}, {words[1]};"]
    lines += [f"xor.b32 t, t, {w};" for w in words[2:]]
    return "\n".join([*lines, "mov.b32 $0, t;", *(f"mov.b32 ${i}, 0;" for i in range(1, 8)), "}"])


VARIANTS["loadonly"] = {"mma_step_asm": _load_only_step}


def config_edit(text: str, fixed: tuple[str, ...] = ()):
    """``edit(config, layout)`` for ``EngineOptions.h2_config_edit`` / ``mma_config_edit``: the keys of
    ``text`` (``KEY=V,...``) replace what the kernel chose; ``split`` multiplies the chosen SPLIT_K (powers
    of two, or 0.5 to halve it). Keys in ``fixed`` are left alone for tile-major codes (the tiles fix
    them)."""
    changes = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        changes[key] = float(value) if key == "split" else int(value)

    def edit(cfg: dict, layout) -> dict:
        for key, value in changes.items():
            if layout.tile_n and key in fixed:
                continue
            if key == "split":
                cfg["SPLIT_K"] = max(1, int(cfg["SPLIT_K"] * value))
            else:
                cfg[key] = value
        return cfg

    return edit


PARAMETRIC = ("cfg:", "mcfg:")


def is_variant(name: str) -> bool:
    return name in VARIANTS or name.startswith(PARAMETRIC)


def variant_options(name: str) -> EngineOptions:
    if name.startswith("cfg:"):  # the half2 GEMV: cfg:num_warps=4,STAGES=3,split=2
        return EngineOptions(h2_config_edit=config_edit(name[4:], fixed=("BN", "BKV")))
    if name.startswith("mcfg:"):  # the tensor-core GEMV: mcfg:NW=8,DEPTH=2,split=2
        return EngineOptions(mma_config_edit=config_edit(name[5:]))
    return EngineOptions(**VARIANTS[name])


def time_variant(model, options: EngineOptions, batches: list[int], args) -> dict:
    engine = Engine(model, options=options)
    out = time_engine(engine, batches, args)
    del engine
    torch.cuda.empty_cache()
    return out


def time_engine(engine: Engine, batches: list[int], args) -> dict:
    """Per batch: median per-token and first-token ms of ``args.repeats`` generations of ``args.input`` random
    prompt tokens + ``args.output`` new ones, after one warm-up generation; and the engine's path."""
    model = engine.model
    out = {}
    for batch in batches:
        gen = torch.Generator(device="cpu").manual_seed(batch)
        ids = torch.randint(0, model.config.vocab_size, (batch, args.input), generator=gen).to("cuda")
        engine.generate(ids, max_new_tokens=args.output, ignore_eos=True)
        firsts, steps = [], []
        for _ in range(args.repeats):
            engine.generate(ids, max_new_tokens=args.output, ignore_eos=True)
            firsts.append(engine.timing.first_token_ms)
            steps.append(engine.timing.per_token_ms)
        out[f"b{batch}"] = {
            "per_token_ms": round(statistics.median(steps), 4),
            "first_token_ms": round(statistics.median(firsts), 3),
            "per_token_all_ms": [round(v, 4) for v in steps],
        }
    out["path"] = engine.path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="mistral-7b")
    ap.add_argument("--methods", default="bf16;int4:group=128;nf4:block=64;int8;fp8;llm.int8:compute=bf16")
    ap.add_argument("--variants", default="base;nopdl", help="';'-separated")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--input", type=int, default=128)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ncu", action="store_true", help="only run 6 eager decode steps (a target for ncu)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("engine_ab: needs a CUDA GPU")
    variants = args.variants.split(";")
    unknown = [v for v in variants if not is_variant(v)]
    if unknown:
        sys.exit(f"engine_ab: unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    batches = [int(b) for b in args.batch.split(",")]
    methods = split_methods([args.methods])
    dev = torch.device("cuda")
    result = {"device": device_name(dev), "arch": args.arch, "input": args.input, "output": args.output,
              "repeats": args.repeats, "rows": []}  # fmt: skip
    if not args.ncu:
        result["copy_gbps"] = round(measure_copy_bandwidth(dev), 1)
        print(f"{result['device']}: copy {result['copy_gbps']:.0f} GB/s", flush=True)
    for spec in methods:
        torch.manual_seed(0)
        model = quantbench.random_model(args.arch, dtype="bf16", device="cuda")
        quantbench.quantize(model, spec)
        if args.ncu:
            ids = torch.randint(0, model.config.vocab_size, (1, args.input), device="cuda")
            engine = Engine(model, cuda_graphs=False, options=variant_options(variants[0]))
            engine.generate(ids, max_new_tokens=6, ignore_eos=True)
            torch.cuda.synchronize()
            return
        for variant in variants:
            options = variant_options(variant)
            row = {"method": spec, "variant": variant, **time_variant(model, options, batches, args)}
            result["rows"].append(row)
            cells = "  ".join(
                f"b{b} {row[f'b{b}']['per_token_ms']:.3f} ms/tok first {row[f'b{b}']['first_token_ms']:.2f}"
                for b in batches
            )
            print(f"{spec:24s} {variant:28s} {cells}", flush=True)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(result, fh, indent=1)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
