"""The import-layer contract of vitmerge/, read from the source (every import, at module level or inside
functions): each room imports only rooms of lower layers, and no module imports itself back in a cycle.

    errors, _version < _io, metadata < merging < request < models < data, plugins < backends < exporter
      < profiling < calibration, packaging < demo, selftest < commands < cli, the package root

Rooms in the same layer do not import each other (calibration does not reach into profiling, ...).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1] / "vitmerge"

LAYERS: List[Set[str]] = [
    {"errors", "_version"},
    {"_io", "metadata"},
    {"merging"},
    {"request"},
    {"models"},
    {"data", "plugins"},
    {"backends"},
    {"exporter"},
    {"profiling"},
    {"calibration", "packaging"},
    {"demo", "selftest"},
    {"commands"},
    {"cli", "<root>"},
]
LEVEL = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> Dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def imports(module: str, path: Path, known: Dict[str, Path]) -> Set[Tuple[str, int]]:
    """(imported vitmerge module, line) for every import statement in the file, wherever it sits."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import name`: an edge to pkg.name when that is a module, else to pkg
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        else:
            continue
        for t in targets:
            if t == "vitmerge" or t.startswith("vitmerge."):
                while t not in known and "." in t:  # `import vitmerge.models.build` names a module; trim attributes
                    t = t.rpartition(".")[0]
                found.add((t, node.lineno))
    return found


def graph() -> Dict[str, Set[Tuple[str, int]]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def violations(g: Dict[str, Set[Tuple[str, int]]]) -> List[str]:
    """Every import that goes sideways or up the layer order."""
    bad = []
    for mod, deps in g.items():
        src = room(mod)
        for dep, line in deps:
            dst = room(dep)
            if dst != src and LEVEL[dst] >= LEVEL[src]:
                where = "sideways" if LEVEL[dst] == LEVEL[src] else "upward"
                bad.append(f"{mod}:{line} imports {dep} ({where}: {src} is layer {LEVEL[src]}, {dst} layer {LEVEL[dst]})")
    return sorted(bad)


def cycles(g: Dict[str, Set[Tuple[str, int]]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    edges = {m: {d for d, _ in deps if d != m} for m, deps in g.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_room_has_a_layer():
    rooms = {room(m) for m in modules()}
    assert rooms <= set(LEVEL), f"rooms without a layer in this test: {sorted(rooms - set(LEVEL))}"


def test_imports_only_go_down():
    bad = violations(graph())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_function_level_imports_are_seen():
    """Imports inside functions count (they are what hid the old merging <-> models cycle)."""
    g = graph()
    lazy = [d for d, _ in g["vitmerge"] if d.startswith("vitmerge.exporter")]
    assert lazy, "vitmerge.export imports the exporter inside the function; the scan must see it"


@pytest.mark.parametrize("src,dst,kind", [("vitmerge.merging.bipartite", "vitmerge.models.vit", "upward"),
                                          ("vitmerge.calibration.quantize", "vitmerge.packaging.triton", "sideways")])
def test_the_checker_catches_a_bad_edge(src, dst, kind):
    g = graph()
    g[src] = set(g[src]) | {(dst, 1)}
    assert any(kind in v and v.startswith(f"{src}:1 imports {dst}") for v in violations(g))


def test_the_checker_catches_a_cycle():
    g = graph()
    g["vitmerge.models.shapes"] = set(g["vitmerge.models.shapes"]) | {("vitmerge.models.budget", 1)}
    assert any("vitmerge.models.shapes" in c and "vitmerge.models.budget" in c for c in cycles(g))
