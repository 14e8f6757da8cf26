"""The package's layers: core <- pretrained <- models <- tools, no import cycle, export/ outside the package.

Every import of a project module is counted, including imports inside functions, so that a cycle cannot hide.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "densenet_efficient"
# What each layer may import of the project (besides itself).
ALLOWED = {
    "core": set(),
    "pretrained": {"core"},
    "models": {"core", "pretrained"},  # create_model and the factories: the one layer that knows both
    "tools": {"core", "pretrained", "models"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports, anywhere in the file, as absolute dotted names."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
            found.update(name if module_file(name) else target for name in names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("densenet_efficient", "export")}


def module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "densenet_efficient" and parts[1] in ALLOWED else None


GRAPH = {module_name(path): project_imports(path) for path in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("module", sorted(name for name in GRAPH if layer(name)))
def test_layers_import_only_downwards(module):
    own = layer(module)
    for target in GRAPH[module]:
        assert layer(target) in ALLOWED[own] | {own}, f"{module} imports {target}"


def test_no_import_cycles():
    def modules_of(name: str) -> set[str]:
        """The graph's modules an import of ``name`` loads: the module and the packages above it."""
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & GRAPH.keys()

    edges = {module: set().union(*(modules_of(t) for t in targets)) - {module} for module, targets in GRAPH.items()}
    # A package importing its own submodules is how packages work; a submodule importing its parent package is
    # the pattern that hides cycles, so those edges stay.
    for module, targets in edges.items():
        edges[module] = {t for t in targets if not t.startswith(module + ".")}
    visiting, done = set(), set()

    def visit(module: str, path: list[str]) -> None:
        if module in done:
            return
        assert module not in visiting, "import cycle: " + " -> ".join([*path, module])
        visiting.add(module)
        for target in sorted(edges[module]):
            visit(target, [*path, module])
        visiting.discard(module)
        done.add(module)

    for module in sorted(edges):
        visit(module, [])


def test_the_package_never_imports_export():
    for module, targets in GRAPH.items():
        assert not any(t.startswith("export") for t in targets), module
