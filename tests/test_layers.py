"""Imports run one way: the library never reaches up into the experiments layer, and no two
fisherlora modules import each other, directly or round a longer loop.

Every module under ``src/fisherlora`` is parsed with ``ast`` (nothing is imported, so the test
needs no torch). Every ``import`` statement counts, wherever it stands: at module level, inside a
function (a deferred import still makes the arrow) and inside ``if TYPE_CHECKING:`` (an import
for annotations only does not run, but it still says which module knows about which, and issue
#19 counts it; the shared names belong in a module both sides can import).
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "fisherlora"
EXPERIMENTS = "fisherlora.experiments"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute dotted name a ``from ... import`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not _is_package(importer):
        base.pop()  # a plain module's relative imports start at its package
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(name: str) -> list[tuple[str, int]]:
    """Every fisherlora module that ``name`` imports, with the line number, wherever it stands."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"), filename=str(MODULES[name]))
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(name, node)
            for alias in node.names:
                # ``from pkg import sub`` imports the submodule pkg.sub when there is one
                sub = f"{module}.{alias.name}"
                targets.append(sub if sub in MODULES else module)
        for target in targets:
            if target == "fisherlora" or target.startswith("fisherlora."):
                # ``import fisherlora.a.b`` where only fisherlora.a exists: keep what exists
                while target not in MODULES and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    found.append((target, node.lineno))
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _library_modules() -> list[str]:
    return [n for n in MODULES if n != EXPERIMENTS and not n.startswith(EXPERIMENTS + ".")]


def test_the_parser_sees_the_package():
    assert "fisherlora.methods.fim_lora" in MODULES
    assert "fisherlora.experiments.train" in MODULES
    train = {target for target, _ in GRAPH["fisherlora.experiments.train"]}
    assert "fisherlora.methods" in train  # a module-level import
    assert "fisherlora" in train  # ``from fisherlora import __version__`` inside a function


# cli.py is the entry point: it sits above both layers and may import the experiments layer
LIBRARY = [n for n in _library_modules() if n != "fisherlora.cli"]


@pytest.mark.parametrize("name", LIBRARY)
def test_the_library_layer_does_not_import_the_experiments_layer(name):
    upward = [
        f"{MODULES[name].relative_to(SRC)}:{line} imports {target}"
        for target, line in GRAPH[name]
        if target == EXPERIMENTS or target.startswith(EXPERIMENTS + ".")
    ]
    assert not upward, "the library layer reaches up into fisherlora.experiments:\n" + "\n".join(
        upward
    )


def _cycles() -> list[list[str]]:
    """One import cycle, as a closed path, in every group of modules that import each other
    (every strongly connected component of the import graph with more than one module)."""
    edges = {name: sorted({target for target, _ in GRAPH[name]}) for name in MODULES}
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for name in sorted(MODULES):
        if name not in index:
            connect(name)

    cycles = []
    for component in components:
        if len(component) < 2:
            continue
        start = min(component)  # a path inside the component from start back to start
        seen, queue = {start: [start]}, [start]
        while queue:
            node = queue.pop(0)
            for nxt in edges[node]:
                if nxt == start:
                    cycles.append([*seen[node], start])
                    queue = []
                    break
                if nxt in component and nxt not in seen:
                    seen[nxt] = [*seen[node], nxt]
                    queue.append(nxt)
    return sorted(cycles)


def test_no_import_cycles():
    cycles = _cycles()
    lines = []
    for cycle in cycles:
        lines.append("import cycle:")
        for here, there in itertools.pairwise(cycle):
            at = sorted({line for target, line in GRAPH[here] if target == there})
            lines.append(f"  {here} -> {there}  ({MODULES[here].relative_to(SRC)}:{at})")
    assert not cycles, "\n".join(lines)


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    a, b = "fisherlora.allocate", "fisherlora.errors"
    assert b in {target for target, _ in GRAPH[a]}
    monkeypatch.setitem(GRAPH, b, [*GRAPH[b], (a, 1)])
    assert [a, b, a] in _cycles()


def test_the_classifier_names_are_the_classifier_registry():
    """causal_models.py knows the classifiers by name only (so that it need not import
    models.py); the names must be the registry's."""
    from fisherlora.experiments.model_names import CLASSIFIER_NAMES
    from fisherlora.experiments.models import MODEL_REGISTRY

    assert sorted(CLASSIFIER_NAMES) == sorted(MODEL_REGISTRY)
