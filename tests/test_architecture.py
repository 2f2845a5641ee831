"""The package's import graph, derived from the code (ast): imports go one direction (commands -> stages ->
leaf helpers) with no cycles, counting imports inside functions too (a function-level import hides a cycle
from Python, not from the design); no domain module imports the CLI layer."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "cptscale"

#: Cycles that exist today, each with why it is still there and who removes it. The test fails when one
#: of them changes (so the list can only shrink) or a new cycle appears. Empty: keep it so.
KNOWN_CYCLES: dict[frozenset[str], str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def import_graph() -> tuple[dict[str, set[str]], int]:
    """module -> cptscale modules it imports (module level and inside functions), and how many import
    statements sit inside functions."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    nested = 0
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):  # TYPE_CHECKING imports count: a design cycle
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            targets = {resolve(n) for n in names if n.startswith("cptscale.")} - {None, mod, "cptscale"}
            graph[mod] |= targets  # type: ignore[arg-type]
            nested += bool(targets) and id(node) not in top
    return graph, nested


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_import_graph_has_no_new_cycles() -> None:
    graph, nested = import_graph()
    found = set(cycles(graph))
    new = [sorted(c) for c in found - set(KNOWN_CYCLES)]
    assert not new, f"import cycles (function-level imports count): {new}"
    gone = [sorted(c) for c in set(KNOWN_CYCLES) - found]
    assert not gone, f"these cycles are gone: remove them from KNOWN_CYCLES: {gone}"
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} import edges, {nested} function-level imports")


def test_no_domain_module_imports_the_cli() -> None:
    """Only cli.py and commands/ may import the CLI layer (a handler raises errors.CLIError instead)."""
    graph, _ = import_graph()
    cli_layer = {m for m in graph if m == "cptscale.cli" or m.startswith("cptscale.commands")}
    bad = {m: sorted(graph[m] & cli_layer) for m in graph if m not in cli_layer and graph[m] & cli_layer}
    assert not bad, bad


def test_cycle_finder_finds_a_hidden_cycle() -> None:
    """The check itself: a cycle through a function-level import is found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset({"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": set()}) == []


def unresolved_imports(paths: list[Path]) -> list[str]:
    """Every ``from cptscale.x import y`` in ``paths`` whose module or name does not exist. Function-level
    imports are only resolved when the function runs, so a rename elsewhere breaks them silently until a
    rare path (the next run, the GPU acceptance script) runs."""
    import importlib

    bad = []
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cptscale"):
                continue
            try:
                mod = importlib.import_module(node.module)
            except ImportError as exc:
                bad.append(f"{p}:{node.lineno}: {node.module} ({exc})")
                continue
            for alias in node.names:
                if alias.name == "*" or hasattr(mod, alias.name):
                    continue
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    bad.append(f"{p}:{node.lineno}: {alias.name} is not in {node.module}")
    return bad


def test_every_cptscale_import_resolves() -> None:
    root = PKG.parents[1]
    paths = sorted([*PKG.rglob("*.py"), *(root / "tests").rglob("*.py"), *(root / "bench").rglob("*.py")])
    assert not unresolved_imports(paths)


def test_unresolved_import_finder_sees_a_stale_name(tmp_path: Path) -> None:
    stale = tmp_path / "stale.py"
    stale.write_text("def f():\n    from cptscale.plan import _planned\n    from cptscale.util import atomic_write\n")
    assert unresolved_imports([stale]) == [f"{stale}:2: _planned is not in cptscale.plan"]
