"""The package's layers point downward only (cli -> report/sweep -> eval, bench, serve, train -> engine ->
quant -> errors): every import statement of a layer's modules, those inside functions included, is read
from the source and checked against the layers it must not reach."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "src" / "quantbench"
ABOVE_ENGINE = (
    "eval",
    "bench",
    "serve",
    "train",
    "report",
    "cli",
    "checkpoint",
    "checkpoint_export",
    "loader",
)
FORBIDDEN = {
    "quant": ("engine", *ABOVE_ENGINE),
    "engine": ABOVE_ENGINE,
    "corpus.py": ("quant", "engine", *ABOVE_ENGINE),
    "errors.py": ("quant", "engine", "corpus", *ABOVE_ENGINE),
    **{layer: ("report", "cli") for layer in ("eval", "bench", "serve", "train")},
    "report": ("cli",),
}


def imported_modules(path: Path) -> set[str]:
    """``quantbench.*`` modules that ``path`` imports anywhere (``from quantbench import x`` counts as
    ``quantbench.x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == "quantbench":
                found.update(f"quantbench.{alias.name}" for alias in node.names)
    return {m for m in found if m.startswith("quantbench.")}


def layer_files(layer: str) -> list[Path]:
    path = ROOT / layer
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("layer", list(FORBIDDEN))
def test_layer_imports_point_downward(layer: str) -> None:
    wrong = []
    for path in layer_files(layer):
        for module in imported_modules(path):
            if module.split(".")[1] in FORBIDDEN[layer]:
                wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from quantbench import eval as e\n    import quantbench.engine.ops\n")
    assert imported_modules(source) == {"quantbench.eval", "quantbench.engine.ops"}
