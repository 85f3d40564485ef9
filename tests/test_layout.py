"""The library's shape: no module imports another that imports it back (top-level or lazy
imports alike), every module stays under 400 lines, and the core (all but kdp.distributed and
the commands, kdp.cli and kdp.commands, whose `kdp sweep` starts Ray) imports no Ray."""
import ast
from pathlib import Path

KDP = Path(__file__).resolve().parents[1] / "kdp"


def _imports() -> dict[str, set[str]]:
    """kdp module -> the kdp modules it imports anywhere in its body."""
    graph = {}
    for path in KDP.rglob("*.py"):
        name = ".".join(path.relative_to(KDP.parent).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kdp":
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "kdp"}
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d, path + [d])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_no_import_cycle():
    graph = _imports()
    assert len(graph) > 40 and _cycle(graph) is None, _cycle(graph)
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail


def test_every_module_is_under_400_lines_and_the_core_imports_no_ray():
    sizes = {p.relative_to(KDP.parent).as_posix(): len(p.read_text().splitlines()) for p in KDP.rglob("*.py")}
    assert max(sizes.values()) < 400, {k: v for k, v in sizes.items() if v >= 400}
    for name, deps in _imports().items():
        if not name.startswith("kdp.distributed") and name not in ("kdp.cli", "kdp.commands"):
            assert not any(d.startswith("kdp.distributed") for d in deps if d != "kdp.distributed.config"), name
    for path in KDP.rglob("*.py"):
        if "distributed" not in path.parts and path.name not in ("cli.py", "commands.py"):
            assert "import ray" not in path.read_text() and "from ray" not in path.read_text(), path
