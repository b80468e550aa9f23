"""Where commands write: checked before any work, replaced atomically, never over a user's files.

* :func:`check_output_dir`: an ``--out`` directory may be new, empty, or (with ``overwrite``) a directory of
  the same kind that quantbench wrote; never a model or checkpoint the command reads, never a file, never an
  unrelated non-empty directory.
* :func:`atomic_dir`: write into a temporary sibling and rename it into place at the end, so a crash (or
  Ctrl-C) leaves the previous directory as it was.
* :func:`check_output_file`: a ``--json`` file must be writable (not a directory) before the work starts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from quantbench.errors import QuantbenchError


class OutputError(QuantbenchError):
    """An output path would overwrite something it must not, or cannot be written."""


def _resolve(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _writable_parent(path: Path, option: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: cannot write in {parent} (permission denied)")


def check_output_dir(
    out: str | Path,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | Path | None] = (),
    is_own: Callable[[Path], bool] | None = None,
    kind: str = "quantbench checkpoint",
    option: str = "--out",
) -> Path:
    """Refuse an output directory that would lose data; return it (as given).

    ``inputs``: paths the command reads (model directory, checkpoint, .gguf or calibration file): the output
    may be none of them and may not contain one. ``is_own(path)`` tells whether an existing non-empty
    directory is one this command may replace (with ``overwrite``); ``kind`` names it in messages.
    """
    out = Path(out).expanduser()
    target = _resolve(out)
    for source in inputs:
        if source is None or not str(source):
            continue
        src = Path(str(source)).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if target == src or target in src.parents:
            raise OutputError(
                f"{option} {out} would overwrite {src}, which this command reads; choose another directory"
            )
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"{option} {out} exists and is not a directory")
        if any(out.iterdir()):
            own = is_own(out) if is_own is not None else False
            if not own:
                raise OutputError(
                    f"{option} {out} is a non-empty directory that is not a {kind}; refusing to overwrite it"
                )
            if not overwrite:
                raise OutputError(f"{option} {out} already holds a {kind}; pass --overwrite to replace it")
    _writable_parent(target, option)
    return out


def check_output_file(path: str | Path | None, option: str = "--json") -> None:
    """Fail before any work if ``path`` cannot be written (a directory, a missing parent...)."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise OutputError(f"{option} {p} is a directory; give a file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputError(f"{option} {p} is not writable")
    if not p.parent.exists():
        raise OutputError(f"{option} {p}: directory {p.parent} does not exist")
    _writable_parent(p.resolve(), option)


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out``; on success it replaces ``out`` (any old one is
    removed only after the new one is in place). On an exception ``out`` is left untouched."""
    out = Path(out).expanduser()
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        yield tmp
        old: Path | None = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.rmdir(old)
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old is not None:
                old.rename(out)  # put the previous directory back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
