"""The engine sits above ``quant/``: the quantization methods never import it; the engine registers how
it reads each quantized layer (``layouts.register_layout``) and its kernels as their CUDA forward
(``quant.base.kernel_forward``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantbench
from quantbench import parse_spec
from quantbench.engine.kernels.layouts import MODE_FP8, MODE_INT, MODE_TABLE, layout_for
from quantbench.quant import METHODS

SRC = Path(quantbench.__file__).parent


def imported_modules(source: str, package: str) -> set[str]:
    """Every module ``source`` (a module of ``package``) imports: import statements (relative ones
    resolved), the names a ``from X import name`` may import as modules, and ``__import__`` /
    ``import_module`` calls with a literal name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if called in ("__import__", "import_module") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def _engine_imports(source: str, package: str = "quantbench.quant") -> set[str]:
    return {
        name
        for name in imported_modules(source, package)
        if name == "quantbench.engine" or name.startswith("quantbench.engine.")
    }


def test_import_scan_finds_engine_imports() -> None:
    """The scan below sees every way a quant module could reach the engine."""
    assert _engine_imports("from quantbench.engine.kernels import dispatch\n")
    assert _engine_imports("def f():\n    import quantbench.engine.kernels.layouts as lay\n")
    assert _engine_imports("from quantbench import engine\n")
    assert _engine_imports("from ..engine import Engine\n")
    assert _engine_imports("import importlib\nm = importlib.import_module('quantbench.engine')\n")
    assert not _engine_imports("from quantbench.quant.base import QuantLinear\nfrom . import rtn\n")


def test_quant_does_not_import_the_engine() -> None:
    offenders = []
    for path in sorted((SRC / "quant").rglob("*.py")):
        package = ".".join(("quantbench", *path.relative_to(SRC).parent.parts))
        found = _engine_imports(path.read_text(), package)
        offenders += [f"{path.relative_to(SRC)}: {name}" for name in sorted(found)]
    assert not offenders, offenders


def test_engine_kernels_are_the_quantized_layers_cuda_forward() -> None:
    """Importing any part of quantbench (here only a quant module, in a fresh process) registers the
    engine's kernel dispatch as the quantized layers' forward hook."""
    code = (
        "import quantbench.quant.rtn\n"
        "from quantbench.quant import base\n"
        "print(base._kernel_forward.__module__, base._kernel_forward.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["quantbench.engine.kernels", "dispatch"]


def _module(spec: str, n: int = 64, k: int = 256):
    cfg = parse_spec(spec)
    lin = torch.nn.Linear(k, n, bias=True)
    return METHODS[cfg.method].linear_cls.from_linear(lin, cfg)


@pytest.mark.parametrize(
    "spec,mode,bits,act",
    [
        ("int4:group=128", MODE_INT, 4, 0),
        ("int8", MODE_INT, 8, 0),
        ("nf4:block=64,dq=1", MODE_TABLE, 4, 0),
        ("fp8", MODE_FP8, 8, 2),
        ("llm.int8", MODE_INT, 8, 1),
        ("smoothquant", MODE_INT, 8, 3),
    ],
)
def test_each_quantized_class_has_its_layout(spec: str, mode: int, bits: int, act: int) -> None:
    layout = layout_for(_module(spec))
    assert layout is not None
    assert (layout.mode, layout.bits, layout.act_quant) == (mode, bits, act)


def test_subclasses_share_a_layout_unless_theirs_differs() -> None:
    """GPTQ / AWQ layers (RTNLinear subclasses) take RTN's layout; GPTQ with act-order (permuted group
    columns) has none, so it keeps its reference forward; other modules have none."""
    from quantbench.quant.awq import AWQLinear
    from quantbench.quant.gptq import GPTQLinear

    plain = GPTQLinear(256, 64, False, parse_spec("gptq:group=128"))
    ordered = GPTQLinear(256, 64, False, parse_spec("gptq:group=64,act_order=1"))
    awq = AWQLinear(256, 64, False, parse_spec("awq:group=128"))
    assert ordered.g_idx is not None
    assert layout_for(plain).mode == MODE_INT and layout_for(awq).mode == MODE_INT
    assert layout_for(ordered) is None
    assert layout_for(torch.nn.Linear(256, 64)) is None
