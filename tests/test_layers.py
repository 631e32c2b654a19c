"""The arrows between the layers of docs/concepts/architecture.md, checked on the source: every import in
``pipeline/`` and ``flows/``, including imports inside functions, is parsed (not executed), mapped from module to
layer, and checked against the one-way list below; the module graph must also have no cycle.

docs/concepts/architecture.md: ``cli -> flows -> jobs -> run -> {posterior, diffusion, data, forward, metrics}``;
nothing imports the CLI; ``diffusion/`` knows nothing of noise removal or of the application config; ``posterior/``
knows nothing of Ray or storage; ``jobs/`` knows nothing of Prefect; ``data/`` does not import ``posterior/``. The
other layers of the page are placed here: ``bench`` (benchmarks, reached only from the CLI), ``outputs`` (the run's
report, summary history, PNG export, plots), ``config`` (the pydantic boundary), ``models`` (shipped priors and the
registry) and ``base`` (bounded parsing of untrusted input; the registries and dataclass-declared settings of
:mod:`pipeline.settings`; used everywhere).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module prefix -> layer; the longest matching prefix wins
LAYER_OF = {
    "pipeline.cli": "cli",
    "pipeline.bench": "bench",
    "flows": "flows",
    "pipeline.jobs": "jobs",
    "pipeline.run": "run",
    "pipeline.training": "run",
    "pipeline.report": "outputs",
    "pipeline.summary": "outputs",
    "pipeline.export": "outputs",
    "pipeline.viz": "outputs",
    "pipeline.config": "config",
    "pipeline.priors": "models",
    "pipeline.registry": "models",
    "pipeline.posterior": "posterior",
    "pipeline.forward": "forward",
    "pipeline.diffusion": "diffusion",
    "pipeline.metrics": "metrics",
    "pipeline.data": "data",
    "pipeline.untrusted": "base",
    "pipeline.settings": "base",
    "pipeline": "base",
}

_FLOORS = {"posterior", "forward", "diffusion", "metrics", "data", "base"}
# layer -> the layers it may import (besides its own)
ALLOWED = {
    "cli": {"bench", "flows", "jobs", "run", "outputs", "config", "models"} | _FLOORS,
    "bench": {"jobs", "run", "outputs", "config", "models"} | _FLOORS,
    "flows": {"jobs", "run", "outputs", "config", "models", "data", "base"},
    "jobs": {"run", "outputs", "config", "models"} | _FLOORS,
    "run": {"outputs", "config", "models"} | _FLOORS,
    "outputs": {"config", "models", "data", "metrics", "base"},
    "config": {"posterior", "forward", "diffusion", "data", "base"},
    "models": {"diffusion", "data", "base"},
    "posterior": {"forward", "diffusion", "metrics", "base"},
    "forward": {"base"},
    "diffusion": {"data", "base"},
    "metrics": {"base"},
    "data": {"forward", "base"},
    "base": set(),
}


def modules() -> dict[str, Path]:
    out = {}
    for top in ("pipeline", "flows"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:``, which are annotations, never imported at run
    time (modules of one package may name each other's types there)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = child.test if isinstance(child, ast.If) else None
            if test is not None and getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its source (``from a import b`` is ``a.b`` when ``b`` is a
    module, else ``a``; relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m.split(".")[0] in ("pipeline", "flows") and m != name}


def layer(module: str) -> str:
    """The layer of ``module``; ``"?"`` for a module of no layer (a new top-level module must be given one)."""
    keys = [p for p in LAYER_OF if module == p or (p != "pipeline" and module.startswith(p + "."))]
    return LAYER_OF[max(keys, key=len)] if keys else "?"


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer():
    assert not [m for m in modules() if layer(m) not in ALLOWED], "modules without a layer in LAYER_OF"


def test_arrows_point_one_way():
    wrong = sorted(f"{a} ({layer(a)}) -> {b} ({layer(b)})" for a, deps in graph().items() for b in deps
                   if layer(b) != layer(a) and layer(b) not in ALLOWED.get(layer(a), ()))
    assert not wrong, "imports against the arrows of docs/concepts/architecture.md:\n" + "\n".join(wrong)


def test_no_import_cycle():
    g = graph()
    # package __init__ modules are skipped as targets: importing pipeline.data.x imports pipeline.data first,
    # which is no arrow of the design
    edges = {a: {b for b in deps if b in g and not (a.startswith(b + "."))} for a, deps in g.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_an_import_inside_a_function(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.run import Run\n"
                   "def f():\n    from pipeline.cli import main\n    import flows.clean_dataset\n")
    assert imports_of("pipeline.data.m", src, {"pipeline.cli", "flows.clean_dataset"}) == {
        "pipeline.cli", "flows.clean_dataset"}
