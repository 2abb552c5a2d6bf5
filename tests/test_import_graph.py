"""The package's import graph, read with ``ast``: no cycles, and the cores never import a face.

Every ``import`` statement counts, also one inside a function: a function-local import that
closes a cycle is still a cycle, only a hidden one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Where each sub-package of the installed ``lightning_privacy`` lives in this repository.
PACKAGE_DIRS = {
    "lightning_privacy": ROOT / "lightning_privacy",
    "lightning_privacy.callbacks": ROOT / "callbacks",
    "lightning_privacy.mlflow_plugins": ROOT / "mlflow_plugins",
}
FACES = (
    "lightning_privacy.callbacks",
    "lightning_privacy.mlflow_plugins",
    "lightning_privacy.cli",
    "lightning_privacy.keras",
)
CORES = ("lightning_privacy.dp", "lightning_privacy.he")


def _modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in sorted(directory.rglob("*.py")):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            modules[name] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of this package that ``name`` imports (anywhere in its body)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if _is_package(path) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # ``import a.b.c`` also runs a and a.b: the longest known prefix is the edge.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None; iterative DFS."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, edges = stack[-1]
            nxt = next(edges, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


def _without_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop the edge a module has to its own parent packages: importing ``a.b`` runs ``a`` first
    anyway, and a package ``__init__`` that re-exports its children is not a cycle of design."""
    return {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}


def test_the_graph_sees_the_package() -> None:
    graph = _graph()
    assert "lightning_privacy.dp.engine" in graph
    assert "lightning_privacy.callbacks.differential_privacy" in graph
    assert "lightning_privacy.dp" in graph["lightning_privacy.callbacks.differential_privacy"] or any(
        t.startswith("lightning_privacy.dp.") for t in graph["lightning_privacy.callbacks.differential_privacy"]
    )


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    cycle = _cycle(_without_parents(_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("core", CORES)
def test_cores_import_no_face_and_not_each_other(core: str) -> None:
    graph = _graph()
    others = tuple(c for c in CORES if c != core)
    for name, targets in graph.items():
        if name == core or name.startswith(core + "."):
            bad = sorted(t for t in targets if t.startswith(FACES) or t.startswith(others))
            assert not bad, f"{name} imports {bad}"


def test_faces_do_not_import_each_other() -> None:
    graph = _graph()
    pairs = [("lightning_privacy.callbacks", "lightning_privacy.mlflow_plugins")]
    for a, b in pairs + [(b, a) for a, b in pairs]:
        for name, targets in graph.items():
            if name == a or name.startswith(a + "."):
                bad = sorted(t for t in targets if t == b or t.startswith(b + "."))
                assert not bad, f"{name} imports {bad}"
