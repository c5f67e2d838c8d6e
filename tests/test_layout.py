"""The package's layers, read from the source: no import cycle, and no import from a layer above.

Every ``import`` counts, those inside functions too (an import put off until a function runs
is still a dependency). The layers, lowest first (README, "Code map"):

0. ground: the model and its files (``danube.model``), ``files``, ``schedule``, ``losses``,
   ``errors``, ``determinism``, ``optim``, ``settings``; the model imports nothing of danube's but
   itself, ``errors`` and ``files``;
1. data, formats and run plumbing: ``data``, ``corpus``, ``hf``, ``lora``, ``swap_tokenizer``, ``eval``,
   ``checkpoints``, ``rundir``, ``logs``, ``precision``, ``plot``, ``cluster``;
2. the typed configs: ``config`` (one schema per script, built from the groups' dataclasses);
3. Lightning: ``lit`` (the LightningModules) and ``callbacks``;
4. tasks: ``tasks`` (what the scripts run) and ``sweep``;
5. entry points: ``cli`` (the ``danube`` command) and ``entry`` (the scripts' door).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "danube"

LAYERS = {
    0: ("danube", "danube.model", "danube.files", "danube.schedule", "danube.losses", "danube.errors",
        "danube.determinism", "danube.optim", "danube.settings"),
    1: ("danube.data", "danube.corpus", "danube.hf", "danube.lora", "danube.swap_tokenizer", "danube.eval", "danube.checkpoints",
        "danube.rundir", "danube.logs", "danube.precision", "danube.plot", "danube.cluster"),
    2: ("danube.config",),
    3: ("danube.lit", "danube.callbacks"),
    4: ("danube.tasks", "danube.sweep"),
    5: ("danube.cli", "danube.entry"),
}
MODEL_MAY_IMPORT = ("danube.model", "danube.errors", "danube.files")


def module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(f): f for f in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The danube modules ``name`` imports (``from danube.x import y`` is ``danube.x.y`` when that is a module)."""
    file = MODULES[name]
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def layer(name: str) -> int:
    matches = [(len(prefix), rank) for rank, prefixes in LAYERS.items() for prefix in prefixes
               if name == prefix or name.startswith(prefix + ".")]
    return max(matches)[1]


def test_every_module_has_a_layer():
    for name in MODULES:
        assert layer(name) in LAYERS, name
    assert {"danube.model.io", "danube.model.loading", "danube.data.finetune", "danube.lit.finetune"} <= set(MODULES)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("danube.model")))
def test_the_model_imports_nothing_above_it(name):
    upward = sorted(m for m in GRAPH[name] if not m.startswith(MODEL_MAY_IMPORT))
    assert not upward, f"{name} imports {upward}: danube.model may import only {MODEL_MAY_IMPORT}"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = sorted(f"{name} (layer {layer(name)}) -> {m} (layer {layer(m)})"
                    for name, deps in GRAPH.items() for m in deps if layer(m) > layer(name))
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    """Tarjan's strongly connected components: any with two or more modules is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert not cycles, f"import cycles: {cycles}"


def test_the_graph_sees_imports_inside_functions():
    """The old cycle was two imports put off into functions: the test must see such imports."""
    assert "danube.model.hf_io" in GRAPH["danube.model.loading"]  # imported inside load_model
