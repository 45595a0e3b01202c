"""Layering a reader can trust: no import cycles among lmadapt's modules (a submodule registering
itself with its own package is the one allowed upward import), and the lower floors load without
the training loop."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "lmadapt").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, known: set[str], deferred: bool = False) -> set[str]:
    """Modules `name` imports when it loads (module level, outside TYPE_CHECKING; with
    `deferred`, inside functions too), each with the packages Python initialises on the way, less
    the packages that contain `name`."""
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            for child in ("body", "orelse", "finalbody"):
                function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                visit(getattr(node, child, []) if deferred or not function else [])
            for handler in getattr(node, "handlers", []):
                visit(handler.body)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    out = set()
    for module in found:
        parts = module.split(".")
        out.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    return {m for m in out & known if m != name and not name.startswith(m + ".")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                found.append(sorted([v, *comp]))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_no_import_cycles():
    mods = _modules()
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    assert _cycles(graph) == []


def test_no_dependency_loop_behind_function_level_imports():
    """A lazy import only postpones a loop: counted too, the modules still form none."""
    mods = _modules()
    graph = {name: _imports(name, path, set(mods), deferred=True) for name, path in mods.items()}
    assert _cycles(graph) == []


def test_the_checker_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    "module",
    ["lmadapt.errors", "lmadapt.config", "lmadapt.methods", "lmadapt.tasks", "lmadapt.data"],
)
def test_configs_and_registries_load_without_torch(module):
    """Reading a run config (the task and method registries with their config classes) imports
    no implementation: no training loop, torch, transformers, peft, sklearn or matplotlib."""
    heavy = ["lmadapt.train.loop", "torch", "transformers", "peft", "sklearn", "matplotlib"]
    code = f"import sys, {module}; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# Floors, lowest first; a module belongs to the longest prefix that names it. Templates and
# verbalizers are formats the prompt-classification task reads; the `prompt` command that runs
# them (runner, modes, sources, teacher and its config) is a recipe like train or distill.
FLOORS: list[tuple[str, list[str]]] = [
    ("foundation", ["lmadapt", "errors", "registry", "schema", "io", "rundir", "paths", "hooks"]),
    ("decoding settings", ["decoding"]),
    ("data", ["data", "models", "train.config"]),
    ("prompt formats", ["prompting"]),
    ("inference", ["inference"]),
    ("evaluate", ["evaluate"]),
    ("tasks and methods", ["tasks", "methods"]),
    ("loop", ["train", "activations"]),
    ("pipeline", ["pipeline", "session", "config", "memory"]),
    (
        "recipes",
        ["api", "distill", "continual", "hpo", "compare", "auto", "export", "generate"]
        + ["export_common", "export_onnx", "export_gguf"]
        + [f"prompting.{m}" for m in ("runner", "modes", "sources", "teacher", "config")],
    ),
    ("surfaces", ["serve", "ui", "cli", "__main__"]),
]


def _floor(module: str) -> int:
    best, length = -1, -1
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            full = "lmadapt" if p == "lmadapt" else f"lmadapt.{p}"
            if (module == full or module.startswith(full + ".")) and len(full) > length:
                best, length = i, len(full)
    assert best >= 0, f"{module} is on no floor: add it to FLOORS"
    return best


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a module on a higher floor, except a package's own submodules (a submodule
    registering itself with its package is the allowed exception)."""
    return sorted(
        f"{a} ({FLOORS[_floor(a)][0]}) -> {b} ({FLOORS[_floor(b)][0]})"
        for a, targets in graph.items()
        for b in targets
        if _floor(b) > _floor(a) and not b.startswith(a + ".")
    )


def test_layers_point_down():
    """Counting function-level imports: a parameter followed from `api.train` down through the
    code never climbs back up, except through the hooks and callables it is handed."""
    mods = _modules()
    graph = {name: _imports(name, path, set(mods), deferred=True) for name, path in mods.items()}
    assert _upward(graph) == []


def test_the_checker_sees_a_climb():
    graph = {"lmadapt.data.readers": {"lmadapt.train.loop"}, "lmadapt.train.loop": set()}
    assert _upward(graph) == ["lmadapt.data.readers (data) -> lmadapt.train.loop (loop)"]


def _long_functions(limit: int) -> list[str]:
    out = []
    for path in (SRC / "lmadapt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > limit:
                    out.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    return sorted(out)


def test_no_function_reads_longer_than_a_screen():
    """#30: a function over 80 lines does several jobs; split it where they part."""
    assert _long_functions(80) == []
