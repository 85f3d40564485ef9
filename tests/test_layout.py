"""The library's shape: no module imports another that imports it back (top-level or lazy
imports alike, and no import by name: `importlib.import_module` and `__import__` would hide an
edge from this check), every module stays under 400 lines, the baselines import no stage, and
the core (all but kdp.distributed and the commands, kdp.cli and kdp.commands, whose `kdp sweep`
starts Ray) imports no Ray."""
import ast
from pathlib import Path

KDP = Path(__file__).resolve().parents[1] / "kdp"


def _imports() -> dict[str, set[str]]:
    """kdp module -> the kdp modules it imports anywhere in its body."""
    graph = {}
    for path in KDP.rglob("*.py"):
        name = ".".join(path.relative_to(KDP.parent).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        tree = ast.parse(path.read_text())
        assert not _by_name(tree), f"{path}: imports by name ({_by_name(tree)}), which hides the edge"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kdp":
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "kdp"}
        graph[name] = deps
    return graph


def _by_name(tree: ast.AST) -> list[str]:
    """The calls of importlib.import_module / __import__ in a module (line numbers)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__"):
                found.append(f"line {node.lineno}")
    return found


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
    hidden = ast.parse("import importlib\nm = importlib.import_module('kdp.baselines')\nn = __import__('kdp')")
    assert _by_name(hidden) == ["line 2", "line 3"]


def test_the_baselines_stand_between_the_core_and_the_stages():
    """A defense declares what it needs and the stages run it; the registry that `build_model`
    reads sits below the defenses (timm's way), filled by importing the package."""
    above = ("kdp.stages", "kdp.graph", "kdp.pipeline", "kdp.cells", "kdp.results", "kdp.report")
    core = ("kdp.models", "kdp.config", "kdp.attacks", "kdp.losses", "kdp.train", "kdp.accel", "kdp.data",
            "kdp.defenses")
    graph = _imports()
    for name, deps in graph.items():
        if name.startswith("kdp.baselines"):
            assert not [d for d in deps if d.startswith(above)], (name, deps)
        if name in core:
            assert not [d for d in deps if d.startswith("kdp.baselines")], (name, deps)
    # the registry is full wherever it is read or a checkpoint is loaded by name (kdp.models.build_model)
    readers = [m for m, deps in graph.items() if not m.startswith(("kdp.baselines", "kdp.defenses", "kdp.models"))
               and deps & {"kdp.defenses", "kdp.checkpoint"} and _reaches(graph, m, "kdp.checkpoint")
               and _loads_by_name(m)]
    assert readers and all(_reaches(graph, m, "kdp.baselines") for m in readers), \
        [m for m in readers if not _reaches(graph, m, "kdp.baselines")]


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    """Does importing `start` import `goal` (a module's parent packages run first)?"""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo += [*graph.get(m, ()), *(".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1))]
    return False


def _loads_by_name(module: str) -> bool:
    """Does the module rebuild models from checkpoints (load_checkpoint / load_frozen) or read the registry?"""
    path = KDP.parent / (module.replace(".", "/") + ".py")
    path = path if path.exists() else path.with_suffix("") / "__init__.py"
    text = path.read_text()
    return any(name in text for name in ("load_checkpoint", "load_frozen", "REGISTRY"))


def test_storage_moves_bytes_and_knows_no_model():
    """The storage layer (docs/design/whiteboard.json: Storage) imports only itself and the base."""
    storage = {"kdp.storage", "kdp.bucket", "kdp.bucket_dirs", "kdp.bucket_io", "kdp.locks", "kdp.datapack",
               "kdp.files"}
    base = {"kdp.errors", "kdp.events", "kdp.flags", "kdp.interrupt", "kdp.provenance"}
    for name, deps in _imports().items():
        if name in storage:
            assert deps <= storage | base, (name, deps - storage - base)
