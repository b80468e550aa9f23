"""Argument checks of ``quantbench eval`` / ``ppl`` that need no model: run before anything is loaded, so a
bad ``--shots`` or ``--limit`` costs milliseconds, not a model load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantbench.errors import QuantbenchError


class ArgumentError(QuantbenchError, ValueError):
    """A command-line value out of range."""


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ArgumentError(f"{name} must be >= {low}, got {value}")


def check_eval_args(
    *,
    shots: int,
    limit: int | None,
    batch_size: int,
    max_new_tokens: int,
    threads: int = 0,
    gpus: int = 1,
    split: str | None = None,
    tasks: list[Any] | None = None,
    subjects: dict[str, list[str] | None] | None = None,
) -> None:
    """Ranges of the eval options; with ``tasks`` (and ``subjects``, per task) the shots are checked against
    every chosen subject's dev split (a few small files) as the harness would, only earlier."""
    _at_least("--shots", shots, 0)
    _at_least("--limit", limit, 1)
    _at_least("--batch-size", batch_size, 1)
    _at_least("--max-new-tokens", max_new_tokens, 1)
    _at_least("--threads", threads, 0)
    _at_least("--gpus", gpus, 1)
    if split == "dev" and shots:
        raise ArgumentError("the dev split holds the few-shot examples: evaluate val or test, or use --shots 0")
    if not shots or not tasks:
        return
    for task in tasks:
        chosen = (subjects or {}).get(task.name) or task.subjects()
        for subject in chosen:
            have = task.max_shots(subject)
            if shots > have:
                raise ArgumentError(
                    f"--shots {shots}: {task.name}/{subject} has only {have} dev examples to draw shots from"
                )


def check_ppl_args(
    *, ctx: int, stride: int | None, max_tokens: int | None, batch_size: int, threads: int = 0
) -> None:
    _at_least("--ctx", ctx, 2)
    if stride is not None and not 1 <= stride <= ctx:
        raise ArgumentError(f"--stride must be between 1 and --ctx ({ctx}), got {stride}")
    _at_least("--max-tokens", max_tokens, 2)
    _at_least("--batch-size", batch_size, 1)
    _at_least("--threads", threads, 0)


def check_method_args(method: str | None, calib: str | None, json_out: str | Path | None = None) -> None:
    """A bad ``--method`` spec, a ``--calib`` the method cannot use, an unwritable ``--json`` file."""
    from quantbench.outputs import check_output_file
    from quantbench.quant.apply import check_calib_option
    from quantbench.quant.config import parse_spec

    if method is not None or calib is not None:
        check_calib_option(parse_spec(method or "bf16"), calib)
    check_output_file(json_out)


def read_text_file(path: str | Path, option: str = "--text") -> str:
    """A text file's contents; non-UTF-8 (binary) data is refused rather than scored as replacement chars."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ArgumentError(f"{option} {p}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArgumentError(f"{option} {p} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    if "\x00" in text:
        raise ArgumentError(f"{option} {p} looks binary (it contains NUL bytes), not text")
    if not text.strip():
        raise ArgumentError(f"{option} {p} is empty")
    return text
