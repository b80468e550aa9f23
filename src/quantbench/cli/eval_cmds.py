"""``quantbench eval``, ``quantbench ppl`` and ``quantbench run`` (quantize every way, evaluate, compare)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from quantbench.cli import app
from quantbench.errors import QuantbenchError

console = Console()


class TextSourceError(QuantbenchError):
    """``--text`` names neither a file nor a known corpus."""


def _read_text(source: str) -> tuple[str, str]:
    """(text, label) from a file path or a named corpus."""
    from quantbench.eval.corpus import CORPORA, load_corpus, resolve_corpus

    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    if resolve_corpus(source) is not None:
        return load_corpus(source), source
    raise TextSourceError(f"--text '{source}' is neither a file nor a corpus; corpora: {', '.join(CORPORA)}")


@app.command()
def ppl(
    model: str = typer.Argument(
        "default", help="packaged model name, HF directory, .gguf file or checkpoint"
    ),
    text: str = typer.Option(
        "kjv-eval", "--text", help="a text file or a named corpus (kjv-eval, kjv-calib)"
    ),
    method: str = typer.Option(None, "--method", "-m", help="quantize first with this spec (default bf16)"),
    ctx: int = typer.Option(512, "--ctx", help="window length in tokens"),
    stride: int = typer.Option(None, "--stride", help="distance between window starts (default ctx/2)"),
    max_tokens: int = typer.Option(None, "--max-tokens", help="only the first N tokens of the text"),
    batch_size: int = typer.Option(1, "--batch-size", help="windows per forward"),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)"),
    json_out: Path = typer.Option(None, "--json", help="write the result as JSON to this file"),
) -> None:
    """Sliding-window perplexity of MODEL on a text file or a packaged corpus."""
    from quantbench.eval.loading import load_for_eval
    from quantbench.eval.perplexity import perplexity

    body, label = _read_text(text)
    model_obj, tokenizer = load_for_eval(model, method, device)
    result = perplexity(
        model_obj,
        tokenizer,
        body,
        ctx=ctx,
        stride=stride,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=True,
    )
    spec = model_obj.quantbench_config.spec
    console.print(
        f"[bold]{spec}[/] on {label}: perplexity [bold]{result.ppl:.4f}[/] (nll {result.nll:.4f}), "
        f"{result.scored}/{result.tokens} tokens scored in {result.windows} windows "
        f"(ctx {result.ctx}, stride {result.stride}), {result.seconds:.1f}s"
    )
    if json_out is not None:
        record = {"model": model, "spec": spec, "text": label, **result.to_dict()}
        json_out.write_text(json.dumps(record, indent=2) + "\n")
