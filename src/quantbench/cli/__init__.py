"""The ``quantbench`` command line. Each group of commands lives in its own module and registers
itself on :data:`app`; :func:`main` turns every user error into one line on stderr and exit code 2."""

from __future__ import annotations

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


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except QuantbenchError as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except click.exceptions.Abort:
        fail("aborted", 130)
    except click.exceptions.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        fail(f"{exc.strerror}: {exc.filename}")
    except torch_oom_types() as exc:
        fail(f"out of memory: {str(exc).splitlines()[0]}")


def torch_oom_types() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (MemoryError,)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
