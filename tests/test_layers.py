"""The package layout's import rules: every import of project code points down the layers, and no module cycles.

Layers, top to bottom (README, "Layout"): tools -> retrieval_service.grpc -> retrieval_service.settings ->
retrieval_service.usecases -> retrieval_service.adapters -> retrieval_service.{errors, tls, metrics, logs} ->
vitrine (the shared contract). export/ and encoder_server/ stand beside the retrieval service and import only
vitrine. Imports are read with `ast` from the source (function-local ones included), so nothing is executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vitrine", "export", "encoder_server", "retrieval_service", "tools")
#: (module prefix, rank, may import): a module may import same-rank modules of its own group and anything in
#: `may import`; the longest matching prefix decides a module's group.
GROUPS: dict[str, tuple[int, tuple[str, ...]]] = {
    "vitrine": (0, ("vitrine",)),
    "export": (1, ("export", "vitrine")),
    "encoder_server": (1, ("encoder_server", "vitrine")),
    "retrieval_service.errors": (1, ("vitrine",)),
    "retrieval_service.deadlines": (1, ("vitrine",)),
    "retrieval_service.tls": (1, ("retrieval_service.errors", "vitrine")),
    "retrieval_service.logs": (1, ("vitrine",)),
    "retrieval_service.metrics": (1, ("vitrine",)),
    "retrieval_service": (1, ()),  # the package's own __init__
    "retrieval_service.adapters": (2, ("retrieval_service.adapters", "retrieval_service.errors",
                                       "retrieval_service.deadlines", "retrieval_service.tls", "vitrine")),
    "retrieval_service.usecases": (3, ("retrieval_service.usecases", "retrieval_service.adapters",
                                       "retrieval_service.errors", "vitrine")),
    "retrieval_service.settings": (4, ("retrieval_service.usecases", "retrieval_service.adapters",
                                       "retrieval_service.tls", "vitrine")),
    "retrieval_service.grpc": (5, ("retrieval_service", "vitrine")),
    "tools": (6, PACKAGES),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "v1" in path.relative_to(ROOT).parts:  # generated stubs
                continue
            modules[_module_name(path)] = path
    return modules


def _imports(path: Path, module: str) -> set[str]:
    """Project modules `module` imports (absolute and relative, top-level and inside functions)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _group(module: str) -> str:
    matches = [g for g in GROUPS if module == g or module.startswith(g + ".")]
    return max(matches, key=len)


MODULES = _project_modules()
GRAPH = {m: {i for i in _imports(p, m) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_the_layout_has_every_layer():
    groups = {_group(m) for m in MODULES}
    assert set(GROUPS) <= groups, f"layers without modules: {sorted(set(GROUPS) - groups)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    group = _group(module)
    rank, allowed = GROUPS[group]
    wrong = []
    for target in sorted(GRAPH[module]):
        target_group = _group(target)
        same_group = target_group == group
        ok = same_group or any(target == a or target.startswith(a + ".") for a in allowed)
        if not ok or (not same_group and GROUPS[target_group][0] > rank):
            wrong.append(f"{target} ({target_group})")
    assert not wrong, f"{module} ({group}) imports {wrong}"


def test_no_import_cycles():
    """Tarjan's strongly connected components over the module graph: every component is one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    # A package __init__ that re-exports its own modules is imported by them only through their package name;
    # drop those edges' false cycles by ignoring components made of one package and its own modules.
    real = [c for c in cycles if not all(m == _package_of(c) or m.startswith(_package_of(c) + ".") for m in c)]
    assert not real, f"import cycles: {real}"


def _package_of(component: list[str]) -> str:
    return min(component, key=len)
