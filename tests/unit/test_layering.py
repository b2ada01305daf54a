"""The package's layering, checked on the source: no import cycles, nothing imports upward, the data
planes import neither scheduling nor the gateway, and no source file grows past 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
MAX_LINES = 600

# Lower ranks are lower layers: a module may import its own rank or lower, never higher.
RANKS: list[tuple[str, int]] = [
    ("ingate.errors", 0),
    ("ingate.naming", 0),
    ("ingate.usage", 0),
    ("ingate.procs", 0),
    ("ingate.tls_options", 0),
    ("ingate.metric_spec", 0),
    ("ingate.request", 1),
    ("ingate.datastore", 1),
    ("ingate.lifecycle", 2),
    ("ingate.objectives", 2),
    ("ingate.telemetry", 2),
    ("ingate.scheduling.config", 2),
    ("ingate.flowcontrol.config", 2),
    ("ingate.config", 3),
    ("ingate.metrics", 4),
    ("ingate.scheduling", 4),
    ("ingate.flowcontrol", 4),
    ("ingate.discovery", 4),
    ("ingate.kube", 4),
    ("ingate.director", 5),
    ("ingate.prefixshare", 5),
    ("ingate.gateway", 6),
    ("ingate.dataplane", 7),
    ("ingate.sim", 7),
    ("ingate.epp_flags", 0),
    ("ingate.epp_config", 4),
    ("ingate.serve", 8),
    ("ingate.quickstart", 9),
    ("ingate.bench", 9),
    ("ingate.cli", 10),
    ("ingate.__main__", 10),
    ("ingate", 0),
]


def _module(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _rank(module: str) -> int:
    for prefix, rank in RANKS:  # the longest matching prefix wins (listed before its parents)
        if module == prefix or module.startswith(prefix + "."):
            return rank
    raise AssertionError(f"{module}: no layer assigned in test_layering.RANKS")


def _top_level_imports(tree: ast.Module) -> set[str]:
    """Modules imported at module level (not inside functions, not under TYPE_CHECKING)."""
    out: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                    visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(tree.body)
    return {m for m in out if m == "ingate" or m.startswith("ingate.")}


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps = set()
        for imp in _top_level_imports(ast.parse(path.read_text())):
            # `from ingate.x import name` names a module only when it is one.
            while imp not in files and "." in imp:
                imp = imp.rsplit(".", 1)[0]
            if imp in files and imp != mod:
                deps.add(imp)
        graph[mod] = deps
    return graph


def test_no_import_cycles() -> None:
    graph = _graph()
    # Packages import their submodules (re-exports); a submodule importing a sibling through the
    # package is the cycle to catch, so package -> own submodule edges are left out.
    edges = {m: {d for d in ds if not d.startswith(m + ".")} for m, ds in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycle = [*stack[stack.index(d) :], d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                dfs(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            dfs(m)


def test_nothing_imports_upward() -> None:
    bad = [
        f"{m} (layer {_rank(m)}) imports {d} (layer {_rank(d)})"
        for m, deps in _graph().items()
        for d in deps
        if _rank(d) > _rank(m) and not d.startswith(m + ".")
    ]
    assert not bad, "\n".join(sorted(bad))


def test_data_planes_import_neither_scheduling_nor_the_gateway() -> None:
    bad = [
        f"{m} imports {d}"
        for m, deps in _graph().items()
        if m.startswith("ingate.dataplane")
        for d in deps
        if d.startswith(("ingate.scheduling", "ingate.gateway", "ingate.director", "ingate.flowcontrol"))
    ]
    assert not bad, "\n".join(bad)


def test_no_source_file_over_600_lines() -> None:
    long = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these files (over {MAX_LINES} lines): {long}"
