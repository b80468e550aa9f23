"""``quantbench export`` and ``quantbench import``: GPTQ / AWQ (GEMM) / compressed-tensors directories <->
quantbench checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from quantbench.cli import app

console = Console()


@app.command("export")
def export_cmd(
    ckpt: Path = typer.Argument(
        ...,
        help="a quantbench checkpoint (gptq/awq: int4, int8, gptq, awq; compressed-tensors also smoothquant, fp8; "
        "gguf: a llama.cpp-format or 16-bit checkpoint, or a packaged model / .gguf file as it is)",
    ),
    fmt: str = typer.Option(
        "gptq",
        "--format",
        "-f",
        help="gptq, awq (AWQ GEMM packing), compressed-tensors (llm-compressor) or gguf (llama.cpp)",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="output directory (transformers / vLLM layout) or .gguf file"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it holds an earlier export"),
) -> None:
    """Write CKPT in the GPTQ, AWQ or compressed-tensors format that transformers and vLLM load, or as a
    llama.cpp GGUF file."""
    from quantbench.checkpoint import read_manifest
    from quantbench.checkpoint_export import export_checkpoint, is_export_dir
    from quantbench.outputs import check_output_dir

    fmt = fmt.lower()
    if fmt == "gguf":
        _export_gguf(ckpt, out, overwrite)
        return
    read_manifest(ckpt)
    kind = "compressed-tensors export" if fmt == "compressed-tensors" else "GPTQ/AWQ export"
    check_output_dir(out, overwrite=overwrite, inputs=[ckpt], is_own=is_export_dir, kind=kind)

    path = export_checkpoint(ckpt, out, fmt, overwrite=overwrite)
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    console.print(f"exported {ckpt} as {fmt} -> {path} ({size / 2**20:.1f} MiB)")


def _export_gguf(source: Path, out: Path, overwrite: bool) -> None:
    from quantbench.gguf_export import export_gguf
    from quantbench.models import load_model
    from quantbench.outputs import OutputError, check_output_file

    if out.suffix != ".gguf":
        raise OutputError(f"--out {out}: a GGUF export is one file; name it *.gguf")
    check_output_file(out, option="--out")
    if out.exists() and not overwrite:
        raise OutputError(f"--out {out} exists; pass --overwrite to replace it")
    model, _ = load_model(str(source), dtype="fp16")
    path = export_gguf(model, out)
    console.print(f"exported {source} as gguf -> {path} ({path.stat().st_size / 2**20:.1f} MiB)")


@app.command("import")
def import_cmd(
    src: Path = typer.Argument(..., help="a GPTQ, AWQ (GEMM) or compressed-tensors model directory"),
    out: Path = typer.Option(..., "--out", "-o", help="quantbench checkpoint directory to write"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace --out if it holds a quantbench checkpoint"
    ),
) -> None:
    """Turn a GPTQ, AWQ or compressed-tensors directory into a quantbench checkpoint (weights bit-identical)."""
    from quantbench.checkpoint import check_checkpoint_out, read_manifest
    from quantbench.checkpoint_export import import_checkpoint

    check_checkpoint_out(out, overwrite=overwrite, inputs=[src])
    path = import_checkpoint(src, out, overwrite=overwrite)
    manifest = read_manifest(path)
    console.print(
        f"imported {src} -> {path}: {manifest['spec']}, {len(manifest['quantized_layers'])} quantized layers"
    )
