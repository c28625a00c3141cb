"""The architecture's rules, checked on the source (see docs/architecture.md).

* no module other than ``stepping.py`` reads a private attribute of a SteppingNet, SteppingIndex or
  NeuronGroup (they offer ``net.index`` and other public API instead);
* the package's import graph has no cycle, function-local imports included (imports under
  ``if TYPE_CHECKING:`` excluded);
* no library module imports an application module;
* building the command-line parser imports neither torch-pruning nor NNI.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nni_steppingnet"
CORE = PACKAGE / "stepping.py"
CORE_CLASSES = ("SteppingNet", "SteppingIndex", "NeuronGroup")

#: The application layer: recipes, the flow, reports, orchestration and the command line.
APPLICATION = frozenset(
    {
        "nni_steppingnet.config",
        "nni_steppingnet.flow",
        "nni_steppingnet.flow_cli",
        "nni_steppingnet.report",
        "nni_steppingnet.cli",
        "nni_steppingnet.__main__",
        "nni_steppingnet.baselines.compare",  # re-export of nni_steppingnet.app.compare for one release
        "nni_steppingnet.nni.experiment",  # `tune`: NNI hyperparameter search over recipes
        "nni_steppingnet.nni.trial",
        "nni_steppingnet.nni.search_space",
        "nni_steppingnet.nni.remote",
    }
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_application(name: str) -> bool:
    return name in APPLICATION or name == "nni_steppingnet.app" or name.startswith("nni_steppingnet.app.")


class _Imports(ast.NodeVisitor):
    """Every ``nni_steppingnet`` module a file imports, at any depth, except under TYPE_CHECKING."""

    def __init__(self, name: str, is_package: bool, known: set[str]) -> None:
        self.name, self.is_package, self.known = name, is_package, known
        self.found: list[tuple[int, str]] = []

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == "nni_steppingnet":
                self.found.append((node.lineno, alias.name))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.name.split(".")
            if not self.is_package:
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        if module.split(".")[0] != "nni_steppingnet":
            return
        for alias in node.names:
            candidate = f"{module}.{alias.name}"
            self.found.append((node.lineno, candidate if candidate in self.known else module))

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("nni_steppingnet.x") with a literal name counts too.
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and node.args[0].value.startswith("nni_steppingnet")
        ):
            self.found.append((node.lineno, node.args[0].value))
        self.generic_visit(node)


def _import_graph() -> dict[str, list[tuple[int, str]]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, list[tuple[int, str]]] = {}
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py", known)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
        graph[name] = [(line, target) for line, target in visitor.found if target != name]
    return graph


def _private_names() -> set[str]:
    """Private attributes and methods of the core classes (``self._x`` in their bodies)."""
    tree = ast.parse(CORE.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ClassDef) and node.name in CORE_CLASSES):
            continue
        for sub in ast.walk(node):
            if (
                isinstance(sub, ast.Attribute)
                and isinstance(sub.value, ast.Name)
                and sub.value.id == "self"
                and sub.attr.startswith("_")
                and not sub.attr.startswith("__")
            ):
                names.add(sub.attr)
            if isinstance(sub, ast.FunctionDef) and sub.name.startswith("_") and not sub.name.startswith("__"):
                names.add(sub.name)
    return names


def _scanned_files() -> list[Path]:
    files = [p for p in PACKAGE.rglob("*.py") if p != CORE]
    files += sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    return sorted(files)


def test_core_private_names_are_found() -> None:
    """The scan below would pass vacuously if it found no private names."""
    names = _private_names()
    assert {"_out_pos", "_in_pos", "_offsets", "_num_neurons", "_assignment", "_bool_mask"} <= names


def test_no_private_attribute_of_the_core_read_outside_stepping() -> None:
    private = _private_names()
    offenders = []
    for path in _scanned_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Attribute) and node.attr in private):
                continue
            # ``self._cache`` of another class is that class's own attribute.
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
    assert not offenders, (
        "private SteppingNet/NeuronGroup attributes read outside stepping.py (use "
        "net.index or other public API):\n" + "\n".join(offenders)
    )


def _cycles(graph: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for _, w in graph.get(v, []):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": [(1, "b")], "b": [(1, "c")], "c": [(1, "a")], "d": [(1, "a")]}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_import_graph_has_no_cycle() -> None:
    graph = _import_graph()
    assert "nni_steppingnet.stepping" in graph and graph["nni_steppingnet.construction.loop"]
    cycles = _cycles(graph)
    assert not cycles, f"import cycles (function-local imports included): {cycles}"


def test_library_never_imports_the_application() -> None:
    graph = _import_graph()
    assert set(APPLICATION) - {"nni_steppingnet.__main__"} <= set(graph), "APPLICATION names a missing module"
    offenders = [
        f"{source} line {line} imports {target}"
        for source, targets in graph.items()
        if not _is_application(source)
        for line, target in targets
        if _is_application(target)
    ]
    assert not offenders, "library modules import the application layer:\n" + "\n".join(offenders)


@pytest.mark.parametrize("heavy", ["torch_pruning", "nni"])
def test_building_the_cli_parser_imports_no_heavy_dependency(heavy: str) -> None:
    code = (
        f"import sys\nfrom nni_steppingnet.cli import build_parser\nbuild_parser()\nprint({heavy!r} in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", f"building the parser imported {heavy}"
