"""The package's layers, read from its imports (ast): no import cycle, and each layer imports only
the layers below it, so the folder listing is the map of the architecture.

Imports inside functions count as much as those at the top (a lazy import that closes a cycle
is still a cycle); only ``if TYPE_CHECKING:`` blocks, which never run, are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "colab_dreambooth"

# Lowest first. A module may import its own layer and those below it, never one above.
LAYERS = [
    ("base", {"errors", "files", "console", "safetensors_stream", "tensor_stream"}),
    ("runtime", {"runtime"}),
    ("config", {"config"}),
    ("data", {"data"}),
    ("models", {"models"}),
    ("generation", {"generation"}),
    ("training", {"training"}),
    ("publish", {"publish"}),
    ("demo", {"demo"}),
    ("cli", {"cli", "__main__"}),
]
RANK = {part: rank for rank, (_, parts) in enumerate(LAYERS) for part in parts}


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(inner) for stmt in node.body for inner in ast.walk(stmt)}
    return skipped


def _imports(path: Path, known: set[str]) -> set[str]:
    """The package modules (and third-party top-level names) ``path`` imports when it runs."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:  # "from pkg import module" imports the module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = sorted((REPO / PACKAGE).rglob("*.py")) + sorted((REPO / "widgets").glob("*.py"))
    known = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, known) for f in files}


def _layer(module: str) -> int:
    return RANK[module.split(".")[1]] if module.count(".") else -1


def test_every_module_sits_in_a_layer(graph):
    unplaced = [m for m in graph if m.startswith(PACKAGE + ".") and m.split(".")[1] not in RANK]
    assert not unplaced, f"add these to LAYERS: {unplaced}"


def test_no_import_cycle(graph):
    edges = {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layers_import_only_downwards(graph):
    upward = [f"{m} -> {t}" for m, targets in graph.items() if m.startswith(PACKAGE + ".")
              for t in targets if t.startswith(PACKAGE + ".") and _layer(t) > _layer(m)]
    assert not upward, "imports of a higher layer:\n" + "\n".join(sorted(upward))


def test_the_core_never_imports_ipywidgets(graph):
    core = [m for m, targets in graph.items() if m.startswith(PACKAGE)
            and any(t.split(".")[0] in ("ipywidgets", "widgets", "IPython") for t in targets)]
    assert not core


def test_nothing_imports_the_command_line(graph):
    importers = [m for m, targets in graph.items() if not m.startswith(f"{PACKAGE}.cli")
                 and m != f"{PACKAGE}.__main__" and any(t.startswith(f"{PACKAGE}.cli")
                                                         for t in targets)]
    assert not importers


@pytest.mark.parametrize("lower", ["config", "data"])
def test_config_and_data_never_import_models_or_training(graph, lower):
    wrong = [f"{m} -> {t}" for m, targets in graph.items() if m.startswith(f"{PACKAGE}.{lower}.")
             for t in targets
             if t.startswith((f"{PACKAGE}.training", f"{PACKAGE}.models", f"{PACKAGE}.generation"))]
    assert not wrong


def test_the_package_imports_itself_at_the_top():
    """No cycle needs an import hidden in a function, so the package's own imports sit at the
    top of each module where a reader sees them; only the command line defers them (its
    ``--help`` stays quick)."""
    hidden = []
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        if path.relative_to(REPO / PACKAGE).parts[0] == "cli":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _type_checking_nodes(tree)
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            hidden += [f"{_module_name(path)}.{function.name}: {node.module}"
                       for node in ast.walk(function) if id(node) not in skipped
                       and isinstance(node, ast.ImportFrom) and node.level == 0
                       and (node.module or "").startswith(PACKAGE)]
    assert not hidden, "imports inside functions:\n" + "\n".join(hidden)
