"""The map of the house, enforced: the import graph of llmflash/, predictors/, research/ and experiments/ (every
import, module-level and function-level, read from the sources with ``ast``) has no cycle, and no module imports a
module of a higher layer.

Layers, lowest first (a module may import its own layer and the layers below it):

- ``core``         llmflash: flash format, storage, cache, FFN math, engine, predictor runtime, model adapters
- ``build``        llmflash.convert, llmflash.gptq, llmflash.reorder: writing flash directories (through the one writer)
- ``training``     predictors/ (collection, training, evaluation of predictors), sparsetrain/ (sparse models by
                   distillation, and the first relufication: sparsetrain.relufy_v1)
- ``research``     research/: trace sources, the scale model, zero-shot, profile-io, reproduce
- ``app``          llmflash.cli, llmflash.commands, llmflash.demo: the command line over all of the above
- ``experiments``  experiments/: the scripts behind results/
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("llmflash", "predictors", "sparsetrain", "research", "experiments")
LAYERS = ("core", "build", "training", "research", "app", "experiments")

BUILD = {"llmflash.convert", "llmflash.gptq", "llmflash.reorder"}
TRAINING: set[str] = set()  # llmflash modules of the training layer: none (training lives in predictors/, sparsetrain/)
APP = {"llmflash.cli", "llmflash.commands", "llmflash.demo"}


# Import edges (importer, imported) tolerated for now, with the reason. Each must still exist (a stale entry fails).
ALLOWED: dict[tuple[str, str], str] = {}


def layer_of(module: str) -> str:
    top = module.split(".")[0]
    if top == "experiments":
        return "experiments"
    if top == "research":
        return "research"
    if top in ("predictors", "sparsetrain") or module in TRAINING:
        return "training"
    if module in APP:
        return "app"
    if module in BUILD:
        return "build"
    assert top == "llmflash", module
    return "core"


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        base = ROOT / pkg
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: set[str]) -> str | None:
    """The most specific module of ours that ``name`` (dotted) names or lies in; None for third-party names."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in modules:
            return cand
    return None


def targets(module: str, is_pkg: bool, node: ast.AST, modules: set[str]) -> set[str]:
    """The modules of ours that one import statement of ``module`` imports."""
    script_dir = module.startswith("experiments.")  # the scripts import each other by bare name (``import common``)

    def ours(name: str) -> str | None:
        hit = _resolve(name, modules)
        if hit is None and script_dir:
            hit = _resolve(f"experiments.{name}", modules)
        return hit

    found: set[str] = set()
    if isinstance(node, ast.Import):
        found = {hit for alias in node.names if (hit := ours(alias.name))}
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            pkg = module.split(".") if is_pkg else module.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        found = {hit for alias in node.names if (hit := ours(f"{base}.{alias.name}" if alias.name != "*" else base))}
    found.discard(module)
    return found


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """Every module of ours that ``module`` imports, anywhere in its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_pkg = path.name == "__init__.py"
    return {t for node in ast.walk(tree) for t in targets(module, is_pkg, node, modules)}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    names = set(files)
    return {m: imports_of(m, p, names) for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def checked_graph() -> dict[str, set[str]]:
    graph = import_graph()
    return {m: {d for d in deps if (m, d) not in ALLOWED} for m, deps in graph.items()}


def test_the_graph_is_read_from_the_sources():
    graph = import_graph()
    assert "llmflash.engine" in graph and "llmflash.cli" in graph and "experiments.common" in graph
    assert "llmflash.errors" in graph["llmflash.engine"]
    assert "experiments.common" in graph["experiments.memlimit"]  # bare-name imports between the scripts
    assert "llmflash.evaluate" in graph["llmflash.commands"]  # a function-level import


def test_no_import_cycle():
    found = cycles(checked_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_imports_a_higher_layer():
    bad = []
    for m, deps in checked_graph().items():
        for d in sorted(deps):
            if LAYERS.index(layer_of(d)) > LAYERS.index(layer_of(m)):
                bad.append(f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})")
    assert not bad, "\n".join(bad)


def test_the_allow_list_is_current():
    graph = import_graph()
    stale = [f"{a} -> {b}" for a, b in ALLOWED if b not in graph.get(a, ())]
    assert not stale, "allow-list entries without their import (remove them): " + ", ".join(stale)


def test_the_core_imports_its_own_modules_at_module_level():
    """A function-level import is where a cycle hides: the core has none of its own modules (the CLI keeps its
    handlers' imports lazy for start-up time; it is the top layer)."""
    files = module_files()
    names = set(files)
    lazy = []
    for m, path in files.items():
        if layer_of(m) != "core":
            continue
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    got = targets(m, path.name == "__init__.py", node, names)
                    lazy += [f"{m}:{node.lineno} imports {d}" for d in sorted(got) if (m, d) not in ALLOWED]
    assert not lazy, "\n".join(lazy)


def test_cycle_finder():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_docstring_maps_every_module():
    """``llmflash/__init__.py``'s map of the house names every module of the package (it must stay true)."""
    import llmflash

    doc = llmflash.__doc__ or ""
    missing = [p.stem for p in sorted((ROOT / "llmflash").glob("*.py"))
               if p.stem != "__init__" and f"``{p.stem}``" not in doc]
    missing += [p.name for p in sorted((ROOT / "llmflash").iterdir())
                if (p / "__init__.py").is_file() and f"``{p.name}``" not in doc]
    assert not missing, f"modules missing from the map in llmflash/__init__.py: {missing}"
