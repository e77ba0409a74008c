"""The package's layout rules: no import cycles, no file over 500 lines.

The import graph is read from the source (every `import` statement, at module level, inside functions and
under `if TYPE_CHECKING:`), so a cycle hidden in a function body fails here too. `from a.b import c` is an
edge to the module `a.b.c` when there is one, else to `a.b`. Importing `a.b.c` also runs the `__init__` of
the package `a.b` first: that is an edge too, unless `a.b` is a package of the importing module itself
(then it is already being imported before the module runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for prunepath/ and kernels/ (installed as prunepath.kernels)."""
    out = {}
    for top, dotted in ((ROOT / "prunepath", "prunepath"), (ROOT / "kernels", "prunepath.kernels")):
        for path in top.rglob("*.py"):
            parts = path.relative_to(top).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((dotted, *parts))] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    own = _packages(name)
    for target in list(found):
        found.update(p for p in _packages(target) if p not in own)
    return {m for m in found if m in modules and m != name}


def _packages(name: str) -> set[str]:
    """The packages above a dotted module name: a.b.c -> {a, a.b}."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_is_read():
    graph = import_graph()
    assert "prunepath.routing.rules" in graph["prunepath.routing"]
    assert "prunepath.kernels.fastpath" in graph["prunepath.kernels"]


def test_a_package_face_is_an_edge_of_whoever_imports_below_it():
    graph = import_graph()
    assert "prunepath.routing" in graph["prunepath.ffn.module"]  # it imports prunepath.routing.rules
    assert "prunepath.routing" not in graph["prunepath.routing.gates"]  # its own package


def test_find_cycle_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_file_over_500_lines():
    too_long = {
        str(path.relative_to(ROOT)): n
        for path in _modules().values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, f"files over {MAX_LINES} lines (split them by concept): {too_long}"


def test_the_repository_names_no_file_outside_it():
    """The method is described in the docstrings and the book (citing Gu, Fu, Yuan 2026), not in a file a
    clone does not have; only the data folder's default location is named, in the Makefile, .ci/run and the
    test configuration."""
    import subprocess

    allowed = {"Makefile", ".ci/run", "tests/conftest.py"}
    words = ("PAPER" + ".md", "MANIFEST" + ".md", "../" + "shared", "/" + "shared/data")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    found = []
    for name in tracked:
        if name in allowed or name.startswith(("results/", "README.md")) or not (ROOT / name).is_file():
            continue
        try:
            text = (ROOT / name).read_text()
        except (UnicodeDecodeError, OSError):
            continue
        # a line that asserts the rule (another test's check) names the words without pointing at them
        lines = [line for line in text.splitlines() if "assert" not in line]
        found += [f"{name}: {w}" for w in words if any(w in line for line in lines)]
    assert not found, "names outside the repository: " + "; ".join(found)
