"""The layers of docs/architecture.md hold: no module imports one of a higher layer, and no
two modules import each other, directly or around a loop.

Imports are read with `ast` from the source (every `import`, including the ones inside
functions that are deferred for speed), so nothing is executed and the test takes
milliseconds.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatch
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "llmpress"

# Top to bottom, as in docs/architecture.md. Each layer is a list of patterns: a package
# name stands for the package and every module in it, a name with `*` is matched as a glob.
# A module belongs to the layer of its most specific pattern (the longest) and may import
# its own layer and the layers below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("llmpress.cli",)),  # the cli package: main and one module per command group
    ("applications of the API", ("llmpress.runtime.server", "llmpress.eval.compare",
                                 "llmpress.eval.speed")),
    ("api", ("llmpress.api", "llmpress=")),  # `llmpress=`: the package __init__ only
    ("algorithms", ("llmpress.runtime", "llmpress.eval", "llmpress.prune", "llmpress.quant",
                    "llmpress.plan")),
    ("calib", ("llmpress.calib",)),
    ("models", ("llmpress.models",)),
    ("kernels", ("llmpress.kernels",)),
    ("io", ("llmpress.io", "llmpress.hub")),
    ("formats", ("llmpress.formats",)),
    ("errors", ("llmpress.errors",)),
]

# Imports up the layers that stay for now, each with the reason and the way out. Empty:
# keep it so, or say here why an exception has to be.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_in(text: str, package: str) -> set[str]:
    """The llmpress modules a module's source imports, `package` being the package it is
    in (for relative imports). `from pkg import name` counts as pkg.name when that is a
    module, else as pkg."""
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name in MODULES}


def imported_modules(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return imports_in(path.read_text(), package) - {module}


GRAPH = {module: imported_modules(module) for module in MODULES}


def matches(module: str, pattern: str) -> bool:
    if pattern.endswith("="):
        return module == pattern[:-1]
    return fnmatch(module, pattern) or module.startswith(pattern + ".")


def layer_of(module: str) -> int:
    candidates = [(len(pattern), rank) for rank, (_, patterns) in enumerate(LAYERS)
                  for pattern in patterns if matches(module, pattern)]
    if not candidates:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and the architecture doc")
    return max(candidates)[1]


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_goes_up_the_layers():
    upward = sorted(
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
        f"({LAYERS[layer_of(target)][0]})"
        for module, targets in GRAPH.items() for target in targets
        if layer_of(target) < layer_of(module) and (module, target) not in KNOWN_UPWARD)
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_known_exceptions_are_still_needed():
    """An exception that the code no longer needs is removed from the list, so it cannot
    hide a new violation later."""
    stale = [pair for pair in KNOWN_UPWARD if pair[1] not in GRAPH.get(pair[0], ())]
    assert not stale, f"no longer imported, remove from KNOWN_UPWARD: {stale}"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    # A package's __init__ that imports its own modules is not a loop back: the modules
    # import the package only to reach their siblings.
    graph = {m: {t for t in targets if not (m.startswith(t + ".") and MODULES[t].name ==
                                            "__init__.py")}
             for m, targets in GRAPH.items()}
    assert not cycles(graph), f"import cycles: {cycles(graph)}"


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_cycle_finder(graph, expected):
    assert cycles(graph) == expected


def test_import_reader_sees_every_kind_of_import():
    text = """
import llmpress.errors
from llmpress.io import gguf
from . import float
from .base import BlockFormat
import numpy

def later():
    from llmpress.models.llama import LlamaModel  # deferred: a dependency all the same
"""
    assert imports_in(text, "llmpress.formats") == {
        "llmpress.errors", "llmpress.io.gguf", "llmpress.formats.float",
        "llmpress.formats.base", "llmpress.models.llama"}
