"""The layering of the code base: dependencies point one way, kernels <- pdd <- export <- dicom_node <- benchmarks.

Measured from the source by ``tests/code_health.py`` (function-level imports included), so a cycle hidden
inside a function counts as a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from code_health import MAX_FILE_LINES, MAX_FUNCTION_LINES, PACKAGES, measure  # tests/ is on the path (rootdir)

ROOT = Path(__file__).resolve().parents[1]
# Where each package may import from (itself included); the command line is the one exception, below.
ALLOWED = {
    "kernels": {"kernels"},
    "pdd": {"kernels", "pdd"},
    "export": {"kernels", "pdd", "export"},
    # The DICOM node is a room above export: it uses pdd and export's client, and only the command line and the
    # benchmarks use it.
    "dicom_node": {"kernels", "pdd", "export", "dicom_node"},
    "benchmarks": {"kernels", "pdd", "export", "dicom_node", "benchmarks"},
}
# The `pdd` command line lives in pdd/ for its entry point and wires export's subcommands in (pdd.cli and
# the helpers its commands share, pdd.cli_models); nothing else imports it.
CLI = {"pdd.cli", "pdd.cli_models"}


@pytest.fixture(scope="module")
def health():
    return measure(ROOT)


def test_the_counter_sees_the_project(health):
    """A guard on the measurement itself: the graph holds every package and the imports known to exist."""
    assert {m.split(".")[0] for m in health.modules} == set(PACKAGES)
    edges = {(i.source, i.target) for i in health.imports}
    assert ("export.onnx_export", "export.metadata") in edges
    assert ("pdd.model", "pdd.config") in edges


def test_no_import_cycles(health):
    assert health.cycles == [], f"import cycles: {health.cycles}"


def test_dependencies_point_down(health):
    upward = [f"{i.source}:{i.line} imports {i.target}" for i in health.imports
              if i.source not in CLI and i.target.split(".")[0] not in ALLOWED[i.source.split(".")[0]]]
    assert upward == []


def test_nothing_imports_the_command_line(health):
    assert [f"{i.source}:{i.line}" for i in health.imports if i.target in CLI and i.source not in CLI] == []


def test_no_sys_path_edits(health):
    assert health.sys_path_edits == []


def test_unit_sizes(health):
    """No file over 500 lines; no function over 80 lines unless its docstring says why it is long."""
    assert health.long_files == {}, f"files over {MAX_FILE_LINES} lines: {health.long_files}"
    unexplained = {name: n for name, n in health.long_functions.items() if not _explained(name)}
    assert unexplained == {}, f"functions over {MAX_FUNCTION_LINES} lines: {unexplained}"


def _explained(qualified: str) -> bool:
    """True when the function's docstring carries a line starting 'Long because'."""
    rel, _, dotted = qualified.partition(".py.")
    tree = ast.parse((ROOT / f"{rel}.py").read_text())
    node: ast.AST = tree
    for part in dotted.split("."):
        node = next(n for n in ast.iter_child_nodes(node)
                    if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and n.name == part)
    doc = ast.get_docstring(node) or ""
    return any(line.strip().startswith("Long because") for line in doc.splitlines())
