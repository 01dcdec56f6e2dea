"""The house rules, read from the source (no model is loaded): a stage owns its rooms and pipeline/ imports no stage,
no import goes round in a circle, no function is over 60 lines and no file over 400, no class is defined inside a
function."""

import ast
import graphlib
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("pipeline", "stages")
MAX_FUNCTION_LINES, MAX_FILE_LINES = 60, 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The modules of this project that `name` imports, at its top or inside a function (`from package import
    module` counts as the module; the root packages, whose __init__ only define names, are left out)."""
    found = set()
    for node in ast.walk(ast.parse(SOURCES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):  # the project's imports are absolute
            assert not node.level, f"{SOURCES[name]}:{node.lineno}: a relative import"
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in SOURCES else node.module for a in node.names
            }
    return {m for m in found if m in SOURCES and m not in PACKAGES and m != name}


@pytest.mark.parametrize("name", [n for n in SOURCES if n.startswith("pipeline")])
def test_pipeline_imports_no_stage(name):
    """pipeline/ is what two stages or the app share; the app reaches the stages by name (importlib), nothing else."""
    assert not [m for m in imports(name) if m.startswith("stages")]


def test_no_import_circle():
    graph = {name: imports(name) for name in SOURCES if name not in PACKAGES}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        pytest.fail(f"import circle: {' -> '.join(err.args[1])}")


@pytest.mark.parametrize("name", list(SOURCES))
def test_functions_and_files_stay_short_and_classes_at_module_level(name):
    path = SOURCES[name]
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{path}: {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name} is {length} lines"
            inner = [n.name for n in ast.walk(node) if isinstance(n, ast.ClassDef)]
            assert not inner, f"{path}:{node.lineno} {node.name} defines class(es) {inner}"
