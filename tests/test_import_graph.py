"""No import cycle in the pack (``nodes/``, ``moma/``) or its tools (``tools/moma_runner``, ``tools/moma_demo``).

A static graph of intra-package imports read from the source (``ast``): every ``import`` and ``from ... import``
anywhere in a module (at module level, in functions and methods) is an edge, relative imports resolved against
the module's package; imports under ``if TYPE_CHECKING:`` (never executed: annotations only) are not. ``from package import name`` is an edge to the submodule when ``name``
is one, else to the package's ``__init__``. A module's own enclosing packages are not edges (Python imports them
first anyway), unless it names one explicitly (``from . import something_defined_in_init``).
Pure Python: no ComfyUI, no torch.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = "<pack>"  # the repository root, which ComfyUI imports as a package (its folder name varies)
# (top-level package name, its folder): the pack's subpackages are <pack>.nodes and <pack>.moma
PACKAGES = {PACK: REPO, "moma_runner": REPO / "tools" / "moma_runner", "moma_demo": REPO / "tools" / "moma_demo"}
PACK_SUBPACKAGES = ("nodes", "moma")


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the checked packages."""
    modules: dict[str, Path] = {}
    for top, folder in PACKAGES.items():
        if top == PACK:
            modules[PACK] = folder / "__init__.py"
            files = [path for sub in PACK_SUBPACKAGES for path in sorted((folder / sub).rglob("*.py"))]
        else:
            files = sorted(folder.rglob("*.py"))
        for path in files:
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([top, *parts])] = path
    return modules


def is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def executed_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    found, pending = [], [tree]
    while pending:
        node = pending.pop()
        found.append(node)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            pending.extend(node.orelse)
        else:
            pending.extend(ast.iter_child_nodes(node))
    return found


def import_edges(name: str, modules: dict[str, Path]) -> set[str]:
    """The checked modules ``name`` imports (anywhere in its source)."""
    tree = ast.parse(modules[name].read_text(encoding="utf-8"), filename=str(modules[name]))
    package = name if is_package(name, modules) else name.rpartition(".")[0]
    targets: set[str] = set()

    def add(target: str, explicit: bool) -> None:
        if target in modules and target != name:
            if explicit or not name.startswith(target + "."):
                targets.add(target)

    for node in executed_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, explicit=True)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                assert base, f"{name}: relative import above the top package"
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    add(submodule, explicit=True)
                else:
                    add(source, explicit=True)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: import_edges(name, modules) for name in modules}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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


def test_the_graph_sees_the_packages_imports():
    """The graph is read right: known edges of each package are in it (relative, absolute, function-level)."""
    graph = import_graph()
    assert len(graph) > 40
    assert f"{PACK}.nodes" in graph[PACK]  # from .nodes import comfy_entrypoint
    assert f"{PACK}.moma.errors" in graph[f"{PACK}.nodes.apply"]  # from ..moma.errors import MomaError
    assert f"{PACK}.nodes.node_api" in graph[f"{PACK}.nodes.apply"]  # from .node_api import io
    assert "moma_runner.boot" in graph["moma_runner.demo"]  # from . import boot
    assert "moma_demo" in graph["moma_runner.demo"]  # import moma_demo
    assert "moma_runner.demo" in graph["moma_runner.cli"]  # function-level: from . import demo
    assert not any(target.startswith("moma_runner") for target in graph["moma_demo"])
    assert f"{PACK}.nodes.patches" not in graph[f"{PACK}.nodes.run_state"]  # only under `if TYPE_CHECKING:`
    assert f"{PACK}.nodes.run_state" in graph[f"{PACK}.nodes.patches"]


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_pack_or_its_tools():
    found = cycles(import_graph())
    assert not found, "import cycles (each a set of modules importing each other): " + "; ".join(
        " <-> ".join(component) for component in found
    )
