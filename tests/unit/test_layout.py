"""The package's shape holds: small modules, short functions, and each stage
package says in its docstring what enters it and what leaves it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "egress_auditor"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
STAGES = ("host", "inputs", "attribution", "capture", "rules", "outputs", "display")


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_package_is_found() -> None:
    assert len(modules()) > 40 and (PACKAGE / "model.py").is_file()


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_and_function_sizes(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: over {MAX_MODULE_LINES} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_says_what_enters_and_leaves(stage: str) -> None:
    docstring = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text())) or ""
    assert docstring, f"{stage}/__init__.py has no docstring"
    assert "In:" in docstring and "Out:" in docstring, f"{stage}: say what enters (In:) and what leaves (Out:)"
