"""The package's shape: modules import downstream only (no cycle, counting function-local imports), no
function-local import of a package module, and no function longer than 80 lines."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cft_ray"
MAX_LINES = 80


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PKG.glob("*.py")) if p.stem != "__init__"}


def _package_imports(node: ast.AST, names: set[str]) -> set[str]:
    """cft_ray modules named by the import statements under `node` (`from cft_ray import a, b`,
    `from cft_ray.a import x`, `import cft_ray.a`)."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == "cft_ray":
            parts = n.module.split(".")
            out |= {parts[1]} if len(parts) > 1 else {a.name for a in n.names if a.name in names}
        elif isinstance(n, ast.Import):
            out |= {a.name.split(".")[1] for a in n.names if a.name.startswith("cft_ray.")}
    return out & names


def _functions(tree: ast.Module):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path, or None (depth-first search with colours)."""
    colour, stack = dict.fromkeys(graph, 0), []

    def visit(m):
        colour[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if colour[d] == 1:
                return stack[stack.index(d):] + [d]
            if colour[d] == 0 and (found := visit(d)):
                return found
        colour[m] = 2
        stack.pop()
        return None

    return next((c for m in sorted(graph) if colour[m] == 0 and (c := visit(m))), None)


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_package_modules():
    mods = _modules()
    graph = {name: _package_imports(tree, set(mods)) - {name} for name, tree in mods.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_no_function_local_import_of_a_package_module():
    mods = _modules()
    local = [f"{name}.py:{f.lineno} {f.name}: {sorted(_package_imports(f, set(mods)))}"
             for name, tree in mods.items() for f in _functions(tree) if _package_imports(f, set(mods))]
    assert not local, local


def test_no_function_longer_than_80_lines():
    long = [f"{name}.py:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for name, tree in _modules().items() for f in _functions(tree) if f.end_lineno - f.lineno + 1 > MAX_LINES]
    assert not long, long
