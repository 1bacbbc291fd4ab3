"""The engine's modules import one another without a cycle.

Imports inside functions count too: a cycle hidden in a function works until
someone moves the import to the top of the file, and it means that neither
module can be understood (or tested) without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = "glmrepl.engine"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def engine_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted((ROOT / "glmrepl" / "engine").rglob("*.py"))}


class _Imports(ast.NodeVisitor):
    """The modules a file imports, wherever the import statement is (``if TYPE_CHECKING`` aside)."""

    def __init__(self, name: str, is_package: bool, known: set[str]):
        self.package = name if is_package else name.rpartition(".")[0]
        self.known = known
        self.found: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            self.generic_visit(ast.Module(body=node.orelse, type_ignores=[]))
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.rsplit(".", node.level - 1)[0] if node.level > 1 else self.package
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        self.found.add(source)
        # `from . import weights` imports the module weights, not a name of the package.
        self.found.update(f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in self.known)


def import_graph() -> dict[str, set[str]]:
    """{module: the engine modules it imports}.

    A submodule's import of its own package (``from .. import FamilyMatch``) is left out:
    Python initialises a package before any of its submodules, so that edge orders nothing."""
    modules = engine_modules()
    graph = {}
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py", set(modules))
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        graph[name] = {
            target
            for target in visitor.found
            if target in modules and target != name and not name.startswith(target + ".")
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The groups of modules that reach one another (strongly connected, more than one module)."""
    reach = {node: _reachable(graph, node) for node in graph}
    groups = {frozenset(other for other in reach[node] if node in reach[other]) for node in graph}
    return sorted((set(group) for group in groups if len(group) > 1), key=sorted)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


# Adapters and the ChatGLM modules that apply them import one another (AdapterError,
# the P-tuning hook in ChatGLM-6B's attention); moving those shared pieces out of
# adapters.py cuts it. Nothing else may join this group or form another.
KNOWN_ADAPTER_CYCLE = {
    f"{ENGINE}.adapters",
    f"{ENGINE}.families.chatglm.lora_layout",
    f"{ENGINE}.families.chatglm.ptuning",
    f"{ENGINE}.families.chatglm.glm1_model",
}


def test_the_graph_sees_imports_inside_functions_and_from_package_imports():
    graph = import_graph()
    assert f"{ENGINE}.families" in graph[f"{ENGINE}.checkpoint"]  # from . import families
    assert f"{ENGINE}.families.chatglm.load" in graph[f"{ENGINE}.families"]  # inside load_family()
    assert f"{ENGINE}.families.chatglm.weights" in graph[f"{ENGINE}.families.chatglm.load"]
    assert f"{ENGINE}.families" not in graph[f"{ENGINE}.families.chatglm.load"]  # its own package
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_validator_and_the_load_pipeline_are_in_no_import_cycle():
    found = cycles(import_graph())
    assert all(group <= KNOWN_ADAPTER_CYCLE for group in found), "import cycles: " + "; ".join(
        " <-> ".join(sorted(group)) for group in found
    )
