"""The ``quantbench`` command line. Each group of commands lives in its own module and registers
itself on :data:`app`; :func:`main` turns every user error into one line on stderr and exit code 2."""

from __future__ import annotations

import contextlib
import sys

import click
import typer

from quantbench.errors import QuantbenchError

app = typer.Typer(
    name="quantbench",
    help="Quantize a causal LM every way, evaluate, benchmark, and report which one to run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command modules register on `app` when imported.
from quantbench.cli import (  # noqa: E402,F401
    bench_cmds,
    calib_cmds,
    eval_cmds,
    quant_cmds,
    report_cmds,
    serve_cmds,
    train_cmds,
)


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` on one line and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(code)


def _click_classes(name: str) -> tuple[type[BaseException], ...]:
    """``name`` from click and from typer's vendored copy of it (typer >= 0.29 raises its own classes)."""
    classes: list[type[BaseException]] = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored
    except ImportError:  # older typer: plain click
        vendored = None
    if vendored is not None and hasattr(vendored, name):
        classes.append(getattr(vendored, name))
    for module in (typer, getattr(typer, "exceptions", None)):  # typer.Exit / typer.Abort
        cls = getattr(module, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in classes:
            classes.append(cls)
    return tuple(classes)


_USAGE_ERRORS = _click_classes("UsageError")
_CLICK_ERRORS = _click_classes("ClickException")
_ABORT = _click_classes("Abort")
_EXIT = _click_classes("Exit")


def _usage_error(exc: BaseException) -> None:
    """The usage line of the command and one ``error:`` line; exit 2."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError":  # `quantbench` / `quantbench GROUP` alone: the help
        exc.show()  # type: ignore[attr-defined]
        raise SystemExit(2)
    if ctx is not None:
        with contextlib.suppress(Exception):
            usage = ctx.get_usage().strip().splitlines()
            if usage:
                typer.echo(usage[0], err=True)
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    if ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    fail(" ".join(message.split()) or type(exc).__name__, 2)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except QuantbenchError as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except _USAGE_ERRORS as exc:
        _usage_error(exc)
    except _ABORT:
        fail("aborted", 130)
    except _CLICK_ERRORS as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        fail(" ".join(message.split()), getattr(exc, "exit_code", 1) or 1)
    except _EXIT as exc:
        raise SystemExit(getattr(exc, "exit_code", 0)) from None
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        fail(f"{exc.strerror}: {exc.filename}")
    except torch_oom_types() as exc:
        fail(f"out of memory: {str(exc).splitlines()[0]}")


def torch_oom_types() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (MemoryError,)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
