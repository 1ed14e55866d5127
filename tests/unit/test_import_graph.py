"""The import graph stays acyclic: no circles between modules, none between packages, and the client
distribution's packages never import a service at module level.

Every import counts, at module level and inside functions (a function-level import hides a circle
from Python, not from a reader), read with ``ast`` without importing anything.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "merge_service": ROOT / "merge_service",
    "inference_service": ROOT / "inference_service",
    "loramerge_common": ROOT / "loramerge_common",
    "loramerge": ROOT / "clients" / "loramerge",
    "loramerge_client": ROOT / "clients" / "loramerge_client",
}
CLIENT_PACKAGES = ("loramerge", "loramerge_client")
SERVICES = ("merge_service", "inference_service")
# Circles known and owned elsewhere; remove an entry when its circle is gone (the test says so).
KNOWN_CYCLES: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            parts = [pkg, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(imported name, run at import time) for every import statement in ``path``: function-level
    imports and ``if TYPE_CHECKING:`` ones are not run at import time, but are edges all the same."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.If | ast.Try):  # optional dependencies, version switches
            top.update(id(n) for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom))
    found = []
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".")
                keep = len(here) - node.level + (1 if is_pkg else 0)
                base = ".".join(here[:keep] + ([node.module] if node.module else []))
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        found.extend((n, id(node) in top) for n in names)
    return found


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(all edges, module-level edges) between this repository's modules."""
    mods = _modules()
    every: dict[str, set[str]] = defaultdict(set)
    top: dict[str, set[str]] = defaultdict(set)
    for module, path in mods.items():
        for name, at_top in _imports(module, path):
            if name in mods and name != module:
                every[module].add(name)
                if at_top:
                    top[module].add(name)
    return every, top


def _cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.add(frozenset(comp))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_between_modules() -> None:
    every, _ = _graph()
    cycles = _cycles(every)
    new = [sorted(c) for c in cycles - KNOWN_CYCLES]
    assert not new, f"import circles (module-level and function-level imports): {new}"
    gone = [sorted(c) for c in KNOWN_CYCLES - cycles]
    assert not gone, f"these circles are gone: remove them from KNOWN_CYCLES: {gone}"


def test_packages_form_a_layered_graph() -> None:
    every, _ = _graph()
    packages: dict[str, set[str]] = defaultdict(set)
    for a, targets in every.items():
        for b in targets:
            pa, pb = a.split(".")[0], b.split(".")[0]
            if pa != pb:
                packages[pa].add(pb)
    assert not _cycles(packages), f"packages import each other in a circle: {dict(packages)}"
    assert not packages["loramerge_common"] & set(SERVICES), "the shared package must not import a service"
    assert not packages["loramerge"], "the contract package imports nothing of this repository"


def test_client_packages_do_not_import_services_at_module_level() -> None:
    _, top = _graph()
    bad = sorted(
        f"{a} → {b}"
        for a, targets in top.items()
        if a.split(".")[0] in CLIENT_PACKAGES
        for b in targets
        if b.split(".")[0] in SERVICES
    )
    assert not bad, f"the client distribution installs without the services; these imports need them: {bad}"


def test_the_walker_sees_function_level_imports() -> None:
    every, top = _graph()
    # Hidden dependencies are what this test exists for: check that it sees one.
    assert "merge_service.pipeline" in every["loramerge_client.commands.merge"]
    assert "merge_service.pipeline" not in top["loramerge_client.commands.merge"]
