"""Data flows one way (GUIDE section 2): every ``aniportrait`` import, at module level or inside a function, points
to a module of the same layer or a lower one, and no chain of imports comes back to where it started."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import REPO

PACKAGE = REPO / "aniportrait"

# lowest first; a module belongs to the longest prefix listed
LAYERS: list[tuple[str, ...]] = [
    ("aniportrait.errors", "aniportrait.utils"),
    ("aniportrait.face", "aniportrait.audio"),
    ("aniportrait.models", "aniportrait.metrics"),
    ("aniportrait.data",),
    ("aniportrait.bundle",),
    ("aniportrait.pipelines",),
    ("aniportrait.training",),
    ("aniportrait.inference",),
    ("aniportrait.api", "aniportrait.evaluation"),
    ("aniportrait.cli", "aniportrait"),
]

# upward imports that predate this rule, each inside one function; the test fails once one is gone (delete it here)
KNOWN_UPWARD: set[tuple[str, str]] = set()


def module_name(path, root=REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_main_block(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``: runs only when the file is the program (``python -m``), never on import."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def imported_modules(path, modules: set[str], root=REPO) -> set[str]:
    """Every aniportrait module ``path`` imports (``from X import Y`` counts Y when Y is itself a module)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if is_main_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "aniportrait")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            if base.split(".")[0] == "aniportrait":
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    edges = {module_name(path): imported_modules(path, modules) for path in paths}
    unknown = {(source, target) for source, targets in edges.items() for target in targets if target not in modules}
    assert not unknown, f"imports of modules that do not exist: {sorted(unknown)}"
    return edges


def layer(module: str) -> int:
    matches = [(len(prefix), index) for index, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of LAYERS: add its package there"
    return max(matches)[1]


def test_every_import_points_down_the_layers(graph) -> None:
    upward = {(source, target) for source, targets in graph.items() for target in targets
              if layer(target) > layer(source)}
    new = sorted(upward - KNOWN_UPWARD)
    assert not new, "imports of a higher layer (move the shared piece down, or pass it in): " + ", ".join(
        f"{source} -> {target}" for source, target in new)
    assert not KNOWN_UPWARD - upward, f"no longer imported, delete from KNOWN_UPWARD: {sorted(KNOWN_UPWARD - upward)}"


def test_no_import_cycles(graph) -> None:
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path) -> None:
    """The check itself: imports inside functions and relative ones are found, ``__main__`` blocks are not."""
    source = tmp_path / "aniportrait" / "inference" / "probe.py"
    source.parent.mkdir(parents=True)
    source.write_text("from . import options\n\ndef f():\n    from aniportrait.api import AniPortrait\n\n"
                      "if __name__ == '__main__':\n    import aniportrait.cli\n")
    modules = {"aniportrait.inference.options", "aniportrait.api", "aniportrait.cli"}
    found = imported_modules(source, modules, root=tmp_path)
    assert found == {"aniportrait.inference", "aniportrait.inference.options", "aniportrait.api"}
    assert layer("aniportrait.api") > layer("aniportrait.inference.probe")


@pytest.mark.slow
def test_every_module_imports_alone(graph) -> None:
    """Each module in a fresh interpreter: an import cycle shows up as a partially initialised module."""
    failures = []
    for module in sorted(graph, key=layer):
        result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True,
                                timeout=300)
        if result.returncode:
            failures.append(f"{module}: {result.stderr.strip().splitlines()[-1]}")
    assert not failures, "\n".join(failures)
