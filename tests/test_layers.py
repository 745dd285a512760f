"""The package's imports point one way, read from the source (nothing is imported):

    cli / server / router / bench / client  ->  chat  ->  engine  ->  cache, models  ->  kernels, uploads

with errors.py, paths.py and text.py below everything. Imports inside `if TYPE_CHECKING:` are names for
type hints only and are not counted. A thin process must not load torch: that is tested by running one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from .conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "warmkv"

# an import may point to its own layer or any lower one (a lower number)
LAYERS = {
    "cli": 5, "__main__": 5, "config_flags": 5, "server": 5, "router": 5, "bench": 5, "client": 5,
    "chat": 4,  # serves the server: templates, messages, tool calls, turn memory
    "engine": 3,
    "cache": 2, "models": 2,
    "kernels": 1, "uploads": 1,  # uploads: host tensors onto the device, for the kernels and the engine
    "errors": 0, "paths": 0, "text": 0,
}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for other in node.orelse:
                found |= _imports(ast.Module(body=[other], type_ignores=[]))
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from warmkv.cache import admin` imports the module warmkv.cache.admin
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        found |= _imports(node)
    return {name for name in found if name == "warmkv" or name.startswith("warmkv.")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the warmkv modules it imports (anywhere in its code, lazily imported ones included)."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {}
    for path in paths:
        named = _imports(ast.parse(path.read_text(), str(path)))
        # `from pkg import name` names a module only when pkg.name is one; otherwise it is pkg itself
        graph[_module_name(path)] = {n for n in named if n in modules} - {_module_name(path)}
    return graph


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_every_package_has_a_layer() -> None:
    unplaced = {_layer(m) for m in import_graph()} - set(LAYERS) - {"warmkv"}
    assert not unplaced, f"give these a layer in tests/test_layers.py: {sorted(unplaced)}"


def test_imports_point_down_the_layers() -> None:
    backward = {
        (module, target)
        for module, targets in import_graph().items()
        for target in targets
        if "." in module and "." in target and LAYERS[_layer(target)] > LAYERS[_layer(module)]
    }
    arrows = ", ".join(f"{a} -> {b}" for a, b in sorted(backward))
    assert not backward, f"imports against the layers ({' -> '.join(LAYERS)}): {arrows}"


def test_no_import_cycles_between_packages() -> None:
    """A package-level cycle (cli <-> server, say) means neither can be read or changed alone."""
    edges: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        for target in targets:
            if _layer(module) != _layer(target):
                edges.setdefault(_layer(module), set()).add(_layer(target))
    cycle = _find_cycle(edges)
    assert cycle is None, "package import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycles_between_modules() -> None:
    cycle = _find_cycle(import_graph())
    assert cycle is None, "module import cycle: " + " -> ".join(cycle or [])


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return [*visiting[visiting.index(node) :], node]
        if node in done:
            return None
        visiting.append(node)
        for target in sorted(edges.get(node, ())):
            found = visit(target)
            if found:
                return found
        visiting.pop()
        done.add(node)
        return None

    for start in sorted(edges):
        found = visit(start)
        if found:
            return found
    return None


def test_layer_check_catches_a_backward_import(tmp_path: Path) -> None:
    """The walker sees lazy imports and skips TYPE_CHECKING ones (so the tests above can fail)."""
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from warmkv.server.app import X\n"
        "def f():\n    from warmkv.engine.llm_engine import LLMEngine\n"
    )
    assert _imports(ast.parse(source)) == {"warmkv.engine.llm_engine", "warmkv.engine.llm_engine.LLMEngine"}


def test_router_does_not_import_torch() -> None:
    code = "import sys, warmkv.router.app; assert 'torch' not in sys.modules, 'the router imported torch'"
    result = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
