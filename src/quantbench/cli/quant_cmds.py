"""``quantbench quantize`` and ``quantbench info``."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from quantbench.cli import app

console = Console()


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f}"


def _input_paths(model: str, calib: str | None) -> list[str]:
    """Local paths a command reads (its model spec, a calibration file): an output may not be one of them."""
    paths = [model]
    if calib:
        paths += [calib, calib.rpartition(":")[0]]
    return [p for p in paths if p and Path(p).expanduser().exists()]


@app.command()
def quantize(
    model: str = typer.Argument("default", help="packaged model name, HF directory or .gguf file"),
    method: str = typer.Option(
        ..., "--method", "-m", help="method spec, e.g. nf4:block=64,dq=1,compute=bf16"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (new or empty)"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace --out if it already holds a quantbench checkpoint"
    ),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    calib: str = typer.Option(
        None,
        "--calib",
        help="calibration data for gptq/awq/smoothquant: corpus[:NxL] or a .txt/.jsonl file[:NxL] "
        "(default corpus:128x2048, scaled down on a CPU)",
    ),
) -> None:
    """Quantize MODEL with one method and save it (safetensors + quantbench.json + tokenizer)."""
    import sys

    from quantbench import parse_spec, save_quantized, weight_report
    from quantbench.checkpoint import check_checkpoint_out
    from quantbench.loader import load
    from quantbench.quant.apply import check_calib_option, shape_skips
    from quantbench.quant.calib import parse_calib

    # Everything that can be checked without the model, before loading it.
    config = parse_spec(method)
    check_calib_option(config, calib)
    parse_calib(calib)
    check_checkpoint_out(out, overwrite=overwrite, inputs=_input_paths(model, calib))
    loaded = load(
        model,
        config,
        calib=calib,
        device=device,
        dequant_cache=False,
        log=lambda line: console.print(line, markup=False, highlight=False),
    )
    model_obj, tokenizer = loaded.model, loaded.tokenizer
    report = weight_report(model_obj)
    odd = shape_skips(report.skipped)
    if odd:
        names = ", ".join(list(odd)[:3]) + (", ..." if len(odd) > 3 else "")
        first = next(iter(odd.values()))
        print(
            f"warning: {len(odd)} layer(s) left unquantized because {config.spec} cannot handle their shape "
            f"({first}): {names}",
            file=sys.stderr,
        )
    save_quantized(model_obj, tokenizer, out, overwrite=overwrite)
    console.print(
        f"[bold]{config.spec}[/]: {report.quantized_layers} layers quantized, {len(report.skipped)} kept, "
        f"{report.bits_per_weight:.3f} bits/weight, model {_gib(report.model_bytes)} GiB "
        f"(16-bit: {_gib(report.model_bytes_16bit)} GiB); load {loaded.load_s:.1f}s, "
        f"quantize {loaded.quantize_s:.1f}s -> {out}"
    )


@app.command()
def info(
    ckpt: Path = typer.Argument(..., help="a directory written by 'quantbench quantize'"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest summary as JSON"),
    verify: bool = typer.Option(False, "--verify", help="also check every file's sha256 (reads it all)"),
) -> None:
    """Show a saved checkpoint's method, bits per weight and size (file sizes are checked; --verify: sha256)."""
    from quantbench.checkpoint import WEIGHTS_NAME, manifest_config, read_manifest, verify_files

    manifest = read_manifest(ckpt)
    manifest_config(manifest, ckpt)
    verify_files(ckpt, manifest, sha256=verify)
    report = manifest.get("report", {})
    files_bytes = sum(p.stat().st_size for p in ckpt.iterdir() if p.is_file())
    summary = {
        "spec": manifest.get("spec"),
        "source": manifest.get("source", {}).get("spec"),
        "quantized_layers": report.get("quantized_layers", len(manifest["quantized_layers"])),
        "kept_layers": len(manifest.get("skipped", {})),
        "bits_per_weight": round(report.get("bits_per_weight", 0.0), 4),
        "model_gib": round(report.get("model_bytes", 0) / 2**30, 4),
        "model_16bit_gib": round(report.get("model_bytes_16bit", 0) / 2**30, 4),
        "weights_file_gib": round((ckpt / WEIGHTS_NAME).stat().st_size / 2**30, 4),
        "dir_gib": round(files_bytes / 2**30, 4),
        "verified": "sha256" if verify else "sizes",
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=str(ckpt), show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    console.print(table)


@app.command()
def methods() -> None:
    """List the quantization methods and their options."""
    from quantbench.quant import METHODS

    table = Table("method", "options (default)", "what it is")
    for method in METHODS.values():
        opts = ", ".join(f"{k}={v.default}" for k, v in method.options.items())
        table.add_row(method.name, opts or "-", method.description)
    console.print(table)
