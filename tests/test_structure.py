"""The source tree's shape: what issue 16 made true, kept true (read from the files, nothing imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "server", "client", "simulations", "benchmarks")
MAX_MODULE_LINES = 500
MAX_BENCHMARK_LINES = 200


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _imported(name: str, tree: ast.Module) -> set[str]:
    """Every module name ``name`` imports, anywhere in the file (``from a import b`` counts a and a.b)."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (module → modules it imports), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []


def test_no_import_cycle_between_project_modules() -> None:
    # An import between a package and a module inside it is no edge: ``from common.ledger import records``
    # in common/ledger/store.py is not a cycle through common/ledger/__init__.py's own imports.
    graph = {name: {m for m in _imported(name, tree) if m in MODULES and m != name
                    and not m.startswith(f"{name}.") and not name.startswith(f"{m}.")}
             for name, tree in TREES.items()}
    cycle = _cycle(graph)
    assert not cycle, "import cycle: " + " → ".join(cycle)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_no_module_outside_the_adapters_imports_a_private_flower_or_opacus_name() -> None:
    offenders = []
    for name, tree in TREES.items():
        if name.startswith("common.adapters"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in {"flwr", "opacus"}:
                dotted = [*(node.module or "").split("."), *(alias.name for alias in node.names)]
            elif isinstance(node, ast.Import):
                dotted = [part for alias in node.names if alias.name.split(".")[0] in {"flwr", "opacus"}
                          for part in alias.name.split(".")]
            else:
                continue
            if any(part.startswith("_") and not part.startswith("__") for part in dotted):
                offenders.append(f"{name}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name: str) -> None:
    lines = MODULES[name].read_text().count("\n")
    script = name.startswith("benchmarks.") and name != "benchmarks.harness"  # the harness is not a benchmark
    limit = MAX_BENCHMARK_LINES if script else MAX_MODULE_LINES
    assert lines <= limit, f"{MODULES[name].relative_to(ROOT)}: {lines} lines > {limit}: split it by concern"


@pytest.mark.parametrize("name", sorted(n for n, p in MODULES.items() if p.name == "__init__.py"))
def test_each_package_init_has_a_one_line_docstring_and_all(name: str) -> None:
    tree = TREES[name]
    doc = ast.get_docstring(tree)
    assert doc and "\n" not in doc.strip(), f"{name}: a one-line docstring"
    targets = [t for node in tree.body if isinstance(node, ast.Assign) for t in node.targets]
    targets += [node.target for node in tree.body if isinstance(node, ast.AnnAssign)]
    assert any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets), f"{name}: no __all__"
