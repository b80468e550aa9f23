"""Measure generation latency per method: first token, per-token decode, tokens/s, memory, and the
fraction of the device's measured copy bandwidth the decode step reaches.

Timing: CUDA events around the prompt (+ first token) and around the decode loop, after a warm-up
generation (which compiles the kernels and captures the CUDA graphs; its time is reported as
``warmup_s``); the median of ``repeats`` generations. Bytes of one decode step = every weight the step
reads (linears, norms, LM head) + the KV cache at its mean length; ``pct_bw`` = those bytes / per-token
time / measured device-to-device copy bandwidth (bytes read + written per second).
"""

from __future__ import annotations

import datetime as _dt
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from quantbench.errors import QuantbenchError


class BenchError(QuantbenchError):
    """A benchmark cannot run as asked (bad batch list, unknown model, ...)."""


@dataclass
class BenchRow:
    model: str
    method: str  # canonical spec
    device: str
    path: str  # which generation path ran (engine / HF fallback)
    batch: int
    input_len: int
    output_len: int
    first_token_ms: float
    per_token_ms: float  # one decode step (batch tokens)
    tokens_per_s: float  # decode throughput: batch / per-token time
    peak_mem_gib: float | None  # CUDA max allocated during generation (None on CPU)
    weights_gib: float
    step_bytes: int  # bytes one decode step reads
    pct_bw: float  # step_bytes / per-token time / copy bandwidth, in %
    copy_gbps: float
    warmup_s: float  # first generation: kernel compilation + graph capture + everything else
    quantize_s: float
    repeats: int
    date: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    )
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written (median)."""
    if nbytes is None:
        nbytes = 2 << 30 if device.type == "cuda" else 64 << 20
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= 3:
            times.append(ms)
    del src, dst
    return 2 * n * 4 / (statistics.median(times) / 1e3) / 1e9


def split_methods(values: list[str]) -> list[str]:
    """``["bf16,nf4:block=64,dq=1,int4"]`` -> ``["bf16", "nf4:block=64,dq=1", "int4"]``.

    Commas separate methods unless the next token is an option of the previous spec (``key=value``
    or a bare flag); ``;`` and whitespace always separate.
    """
    from quantbench.quant import METHODS

    specs: list[str] = []
    for value in values:
        for chunk in value.replace(";", " ").split():
            for token in chunk.split(","):
                token = token.strip()
                if not token:
                    continue
                name = token.partition(":")[0].lower()
                if name in METHODS or not specs:
                    specs.append(token)
                else:
                    specs[-1] += "," + token
    return specs


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.replace(" ", "").split(",") if b]
    except ValueError:
        raise BenchError(f"--batch must be comma-separated integers, got '{text}'") from None
    if not batches or any(b < 1 or b > 64 for b in batches):
        raise BenchError(f"--batch values must be between 1 and 64, got '{text}'")
    return batches


def bench_model_spec(model: str, layers: int | None) -> str:
    """``model`` for :func:`quantbench.loader.load`; ``layers`` (random:ARCH only) overrides the depth."""
    if not layers:
        return model
    if not model.startswith("random:"):
        raise BenchError("--layers only applies to random:ARCH models")
    arch, _, rest = model.split(":", 1)[1].partition(":")
    return f"random:{arch}:" + ",".join(filter(None, [rest, f"num_hidden_layers={layers}"]))


def _kv_bytes(engine, batch: int, mean_len: float) -> int:
    em = engine.em
    if em is None:
        return 0
    per_pos = 2 * len(em.layers) * em.n_kv * em.head_dim * torch.finfo(em.dtype).bits // 8
    return int(per_pos * batch * mean_len)


def bench_methods(
    model: str,
    specs: list[str],
    batches: list[int],
    input_len: int,
    output_len: int,
    device: torch.device,
    repeats: int = 3,
    layers: int | None = None,
    copy_gbps: float | None = None,
    log: Callable[[str], None] = print,
    on_row: Callable[[BenchRow], None] | None = None,
    calib: str | None = None,
    llama_cpp: bool = False,
) -> list[BenchRow]:
    """Quantize ``model`` with each spec (through :func:`quantbench.loader.load`; calibrated methods on
    ``calib``), run the engine at each batch size, return one row per pair.

    ``llama_cpp``: after each batch-1 row, the same model written as GGUF is timed in llama.cpp
    (:mod:`quantbench.bench.llamacpp`) on the same prompt, as an extra row whose path is ``llama.cpp``.
    """
    import quantbench
    from quantbench import loader
    from quantbench.engine import Engine
    from quantbench.quant.apply import model_bytes

    if copy_gbps is None:
        copy_gbps = measure_copy_bandwidth(device)
        log(f"measured copy bandwidth on {device_name(device)}: {copy_gbps:.0f} GB/s (read + write)")
    rows: list[BenchRow] = []
    model_spec = bench_model_spec(model, layers)
    for spec in specs:
        config = quantbench.parse_spec(spec)
        # Loaded straight in the compute dtype, not float32: a 7B+ model then fits the GPU while it is
        # quantized (the timings do not depend on the master weights' precision).
        base_dtype = config.compute_dtype if config.method not in ("fp32", "fp16", "bf16") else None
        dtype = base_dtype or {"fp32": torch.float32, "fp16": torch.float16}.get(
            config.method, torch.bfloat16
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        loaded = loader.load(
            model_spec,
            config,
            calib=calib,
            device=str(device),
            dtype=dtype,
            dequant_cache=False,
            need_tokenizer=False,
            log=log,
        )
        net, quantize_s = loaded.model, loaded.quantize_s
        del loaded
        weights_gib = model_bytes(net) / 2**30
        if device.type == "cuda":  # peak of inference only (building the bf16 model first is not counted)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        engine = Engine(net)
        vocab = net.config.vocab_size
        for batch in batches:
            gen = torch.Generator(device="cpu").manual_seed(batch)
            ids = torch.randint(0, vocab, (batch, input_len), generator=gen).to(device)
            t0 = time.perf_counter()
            engine.generate(ids, max_new_tokens=output_len, ignore_eos=True)
            warmup_s = time.perf_counter() - t0
            firsts, steps = [], []
            for _ in range(repeats):
                engine.generate(ids, max_new_tokens=output_len, ignore_eos=True)
                firsts.append(engine.timing.first_token_ms)
                steps.append(engine.timing.per_token_ms)
            first_ms = statistics.median(firsts)
            step_ms = statistics.median(steps) if output_len > 1 else float("nan")
            step_bytes = 0
            if engine.em is not None:
                step_bytes = engine.em.weight_bytes_per_token() + _kv_bytes(
                    engine, batch, input_len + output_len / 2
                )
            pct = (
                100.0 * step_bytes / (step_ms / 1e3) / (copy_gbps * 1e9)
                if step_ms == step_ms
                else float("nan")
            )
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            peak_gib = round(peak, 3) if peak == peak else None
            row = BenchRow(
                model=model,
                method=config.spec,
                device=device_name(device),
                path=engine.last_path,
                batch=batch,
                input_len=input_len,
                output_len=output_len,
                first_token_ms=round(first_ms, 3),
                per_token_ms=round(step_ms, 4),
                tokens_per_s=round(batch * 1e3 / step_ms, 1) if step_ms == step_ms else float("nan"),
                peak_mem_gib=peak_gib,
                weights_gib=round(weights_gib, 3),
                step_bytes=step_bytes,
                pct_bw=round(pct, 1),
                copy_gbps=round(copy_gbps, 1),
                warmup_s=round(warmup_s, 2),
                quantize_s=round(quantize_s, 2),
                repeats=repeats,
                extra={
                    "first_token_all_ms": [round(v, 3) for v in firsts],
                    "per_token_all_ms": [round(v, 4) for v in steps],
                },
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
            log(
                f"{config.spec:40s} b{batch:<3d} first {first_ms:8.2f} ms  step {step_ms:7.3f} ms  "
                f"{row.tokens_per_s:8.1f} tok/s  {row.pct_bw:5.1f}% bw  peak {peak:6.2f} GiB"
            )
            if llama_cpp and batch == 1:
                peer = _llama_cpp_row(net, row, ids[0].tolist(), log)
                if peer is not None:
                    rows.append(peer)
                    if on_row is not None:
                        on_row(peer)
        del engine, net
        gc.collect()
    return rows


def _llama_cpp_row(
    net: torch.nn.Module, row: BenchRow, prompt_ids: list[int], log: Callable[[str], None]
) -> BenchRow | None:
    """The llama.cpp row beside ``row`` (same model as GGUF, same prompt), or None when it has no GGUF form."""
    from quantbench.bench.llamacpp import bench_llama_cpp
    from quantbench.gguf_export import GGUFExportError

    try:
        result = bench_llama_cpp(net, prompt_ids, row.output_len, repeats=row.repeats)
    except GGUFExportError as exc:
        log(f"llama.cpp: {row.method} skipped: {exc}")
        return None
    step_ms = result.pop("per_token_ms")
    peer = replace(
        row,
        method=f"llama.cpp {row.method}",
        path="llama.cpp",
        first_token_ms=round(result.pop("first_token_ms"), 3),
        per_token_ms=round(step_ms, 4),
        tokens_per_s=round(1e3 / step_ms, 1) if step_ms == step_ms else float("nan"),
        peak_mem_gib=None,
        weights_gib=round(result["gguf_bytes"] / 2**30, 3),
        step_bytes=0,
        pct_bw=float("nan"),
        warmup_s=float("nan"),
        extra=result,
    )
    log(
        f"{peer.method:40s} b1   first {peer.first_token_ms:8.2f} ms  step {step_ms:7.3f} ms  "
        f"{peer.tokens_per_s:8.1f} tok/s  ({result['threads']} threads, llama-cpp-python "
        f"{result['llama_cpp_version']})"
    )
    return peer


def store_rows(db: str, rows: list[BenchRow]) -> str:
    """Write rows to the SQLite results store (``eval/store.py``'s ``runs`` table, task='bench')."""
    from quantbench.eval.store import ResultStore

    with ResultStore(db) as store:
        for r in rows:
            store.add_run(
                model=r.model,
                fingerprint=f"bench:{r.model}",
                spec=r.method,
                method=r.method.partition(":")[0],
                task="bench",
                split=f"b{r.batch}-in{r.input_len}-out{r.output_len}",
                shots=0,
                mode="generate",
                wall_s=r.first_token_ms / 1e3 + r.per_token_ms * (r.output_len - 1) / 1e3,
                weights_gib=r.weights_gib,
                peak_mem_gib=r.peak_mem_gib,
                peak_mem_kind="cuda-max-allocated" if "CPU" not in r.device else None,
                quantize_s=r.quantize_s,
                device=r.device,
                extra={k: v for k, v in r.to_dict().items() if k not in ("model", "method", "device")},
            )
    return db
