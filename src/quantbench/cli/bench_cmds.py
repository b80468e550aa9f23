"""``quantbench bench``: generation latency and throughput of each method on this device."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from quantbench.cli import app

console = Console(width=160)


@app.command()
def bench(
    model: str = typer.Argument(
        ..., help="random:ARCH (e.g. random:mistral-7b), packaged model name or HF dir"
    ),
    methods: list[str] = typer.Option(
        ["bf16"],
        "--methods",
        "-m",
        help="method specs, comma/space separated (nf4:block=64,dq=1 stays whole)",
    ),
    batch: str = typer.Option("1", "--batch", "-b", help="batch sizes, e.g. 1,8 (1..64)"),
    input_len: int = typer.Option(128, "--input", help="prompt tokens"),
    output_len: int = typer.Option(128, "--output", help="generated tokens"),
    repeats: int = typer.Option(3, "--repeats", help="timed generations per point (median)"),
    device: str = typer.Option("cuda", help="cuda or cpu (cpu: the pure-torch reference path)"),
    calib: str = typer.Option(
        None, "--calib", help="calibration data for gptq/awq/smoothquant: corpus[:NxL] (default: kjv-calib)"
    ),
    layers: int = typer.Option(0, "--layers", help="random:ARCH only: number of decoder layers (0 = real)"),
    db: str = typer.Option("quantbench.db", "--db", help="SQLite results store ('' = do not store)"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the rows as JSON"),
    llama_cpp: bool = typer.Option(
        False,
        "--llama-cpp",
        help="CPU, batch 1: also time llama.cpp (llama-cpp-python) on the same model written as GGUF",
    ),
) -> None:
    """Measure first-token latency, per-token latency, tokens/s, peak memory and % of copy bandwidth."""
    import torch

    from quantbench.bench.runner import BenchError, bench_methods, device_name, parse_batches, split_methods
    from quantbench.quant import parse_spec

    specs = split_methods(methods)
    for spec in specs:
        parse_spec(spec)  # fail on a bad spec before loading anything
    batches = parse_batches(batch)
    if input_len < 1 or output_len < 1:
        raise BenchError("--input and --output must be >= 1")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("no CUDA device here; use --device cpu for the reference path")
    if llama_cpp:
        from quantbench.bench.llamacpp import LlamaCppUnavailable, llama_cpp_version

        if dev.type != "cpu":
            raise BenchError("--llama-cpp compares CPU engines: use --device cpu")
        if llama_cpp_version() is None:
            raise LlamaCppUnavailable(
                "--llama-cpp needs llama-cpp-python (pip install llama-cpp-python; it builds llama.cpp from source)"
            )
    rows = bench_methods(
        model,
        specs,
        batches,
        input_len,
        output_len,
        dev,
        repeats=repeats,
        layers=layers or None,
        log=console.print,
        calib=calib,
        llama_cpp=llama_cpp,
    )
    table = Table(title=f"{model} on {device_name(dev)}, {input_len} in + {output_len} out")
    for col in ("method", "batch", "first token ms", "ms/token", "tok/s", "% bw", "peak GiB", "weights GiB"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.method,
            str(r.batch),
            f"{r.first_token_ms:.2f}",
            f"{r.per_token_ms:.3f}",
            f"{r.tokens_per_s:.1f}",
            f"{r.pct_bw:.1f}",
            "-" if r.peak_mem_gib is None else f"{r.peak_mem_gib:.2f}",
            f"{r.weights_gib:.2f}",
        )
    console.print(table)
    for spec, path in dict.fromkeys((r.method, r.path) for r in rows):
        console.print(f"{spec}: {path}")
    if rows:
        console.print(f"copy bandwidth: {rows[0].copy_gbps:.0f} GB/s (read + write)")
    if db:
        from quantbench.bench.runner import store_rows

        store_rows(db, rows)
        console.print(f"stored {len(rows)} rows in {db} (runs table, task='bench')")
    if json_out is not None:
        json_out.write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
