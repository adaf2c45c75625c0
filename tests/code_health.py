"""Structure of the code base, measured from its source: the project import graph and unit sizes.

What it reports (``python tests/code_health.py [--root DIR] [--json]``):

- the import graph of the project packages (``pdd``, ``kernels``, ``export``, ``dicom_node``, ``benchmarks``),
  module-level and function-level imports alike (imports under ``if TYPE_CHECKING:`` never run and are left
  out), and its cycles (strongly connected components of more than one module, or a module importing itself);
- function-level imports of project modules;
- edits of ``sys.path``;
- files over :data:`MAX_FILE_LINES` lines and functions over :data:`MAX_FUNCTION_LINES` lines;
- the README's length.

``tests/test_layering.py`` holds the layering rules against these facts.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

PACKAGES = ("pdd", "kernels", "export", "dicom_node", "benchmarks")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Import:
    """One import statement's edge: ``source`` module imports ``target`` module (at ``line``)."""

    source: str
    target: str
    line: int
    in_function: bool


@dataclass
class Health:
    modules: list[str] = field(default_factory=list)
    imports: list[Import] = field(default_factory=list)
    cycles: list[list[str]] = field(default_factory=list)
    sys_path_edits: list[str] = field(default_factory=list)
    long_files: dict[str, int] = field(default_factory=dict)
    long_functions: dict[str, int] = field(default_factory=dict)
    readme_lines: int = 0

    @property
    def function_level_imports(self) -> list[Import]:
        return [i for i in self.imports if i.in_function]

    def summary(self) -> dict[str, int]:
        return {
            "modules": len(self.modules),
            "import cycles": len(self.cycles),
            "modules in cycles": sum(len(c) for c in self.cycles),
            "function-level project imports": len(self.function_level_imports),
            "sys.path edits": len(self.sys_path_edits),
            f"files > {MAX_FILE_LINES} lines": len(self.long_files),
            f"functions > {MAX_FUNCTION_LINES} lines": len(self.long_functions),
            "README lines": self.readme_lines,
        }


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_files(root: Path) -> Iterator[Path]:
    for package in PACKAGES:
        base = root / package
        if base.is_dir():
            yield from sorted(p for p in base.rglob("*.py") if "results" not in p.relative_to(root).parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import node that runs, with whether it sits inside a function."""

    def visit(node: ast.AST, in_function: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    yield from visit(sub, in_function)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, in_function
            yield from visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef
                                                                        | ast.Lambda))

    yield from visit(tree, False)


def _resolve(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: set[str]) -> list[str]:
    """The project modules an import statement loads (the deepest existing module for each name)."""

    def deepest(name: str) -> str | None:
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            candidate = ".".join(parts[:n])
            if candidate in known:
                return candidate
        return None

    if isinstance(node, ast.Import):
        found = [deepest(a.name) for a in node.names]
        return [f for f in found if f]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    targets = []
    for alias in node.names:
        target = deepest(f"{prefix}.{alias.name}") or deepest(prefix)
        if target:
            targets.append(target)
    return sorted(set(targets))


def _sys_path_edits(tree: ast.AST) -> Iterator[int]:
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value
        elif isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                target = t.value if isinstance(t, ast.Subscript) else t
        if (isinstance(target, ast.Attribute) and target.attr == "path" and isinstance(target.value, ast.Name)
                and target.value.id == "sys"):
            yield node.lineno


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns the components that form cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    cycles.append(sorted(component))
    return sorted(cycles)


def _long_functions(tree: ast.AST, module: str) -> Iterator[tuple[str, int]]:
    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}.{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = child.end_lineno - child.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        yield name, lines
                yield from visit(child, name)
            else:
                yield from visit(child, prefix)

    yield from visit(tree, module)


def measure(root: str | Path, include_tests: bool = True) -> Health:
    """Measure the tree at ``root`` (a checkout of this project)."""
    root = Path(root).resolve()
    files = list(_project_files(root))
    trees = {p: ast.parse(p.read_text(), str(p)) for p in files}
    known = {module_name(root, p) for p in files}
    health = Health(modules=sorted(known))
    for path, tree in trees.items():
        module = module_name(root, path)
        for node, in_function in _walk_imports(tree):
            for target in _resolve(module, path.name == "__init__.py", node, known):
                if target != module:  # a package's own names (`from . import x`, x not a module)
                    health.imports.append(Import(module, target, node.lineno, in_function))
        health.sys_path_edits += [f"{path.relative_to(root)}:{line}" for line in _sys_path_edits(tree)]
    graph: dict[str, set[str]] = {m: set() for m in known}
    for imp in health.imports:
        graph[imp.source].add(imp.target)
    health.cycles = _strongly_connected(graph)
    sized = files + (sorted((root / "tests").rglob("*.py")) if include_tests and (root / "tests").is_dir() else [])
    for path in sized:
        text = path.read_text()
        rel = str(path.relative_to(root))
        n = text.count("\n")
        if n > MAX_FILE_LINES:
            health.long_files[rel] = n
        tree = trees.get(path) or ast.parse(text, rel)
        for name, lines in _long_functions(tree, rel):
            health.long_functions[name] = lines
    readme = root / "README.md"
    health.readme_lines = readme.read_text().count("\n") if readme.is_file() else 0
    return health


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=Path(__file__).resolve().parents[1], type=Path)
    parser.add_argument("--json", action="store_true", help="everything, as JSON")
    args = parser.parse_args(argv)
    health = measure(args.root)
    if args.json:
        out = asdict(health)
        out["summary"] = health.summary()
        print(json.dumps(out, indent=1))
        return 0
    for key, value in health.summary().items():
        print(f"{key:>34}: {value}")
    for cycle in health.cycles:
        print("cycle:", " <-> ".join(cycle))
    for imp in health.function_level_imports:
        print(f"function-level: {imp.source}:{imp.line} -> {imp.target}")
    for name, lines in sorted(health.long_files.items(), key=lambda kv: -kv[1]):
        print(f"long file: {name} {lines}")
    for name, lines in sorted(health.long_functions.items(), key=lambda kv: -kv[1]):
        print(f"long function: {name} {lines}")
    for edit in health.sys_path_edits:
        print("sys.path edit:", edit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
