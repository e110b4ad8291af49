"""Imports only point down: each deit_train module imports only from its own layer or below, and no two packages
import each other (directly or round a loop). Every import counts, those inside functions too (read with ``ast``)."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

# bottom to top; a name covers the module and the modules below it (deit_train.data covers deit_train.data.stream)
LAYERS = [
    ["deit_train.errors", "deit_train.stops"],
    ["deit_train.data", "deit_train.models", "deit_train.losses"],
    ["deit_train.teacher"],
    ["deit_train.modules"],
    ["deit_train.run"],
    ["deit_train.compare", "deit_train.search"],
    # the commands, and the package root (its __init__ alone) that registers the config resolvers
    ["deit_train.train", "deit_train.__main__", "deit_train.eval", "deit_train.export", "deit_train.predict",
     "deit_train.benchmark", "deit_train.teacher_cache", "deit_train.pack", "deit_train.average", "deit_train"],
]
ROOT_PACKAGE = "deit_train"


def room(module: str) -> str | None:
    """The LAYERS entry a module belongs to (``deit_train.data`` for ``deit_train.data.stream``); None if none."""
    names = [n for layer in LAYERS for n in layer
             if module == n or (n != ROOT_PACKAGE and module.startswith(f"{n}."))]
    return max(names, key=len) if names else None


def layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if room(module) in names)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(module: str) -> bool:
    path = ROOT / module.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """The deit_train modules that ``source`` (the text of ``module``) imports, anywhere in it."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from .x import y` in package p is p.x; each further dot climbs one package
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from deit_train.data import stream` imports deit_train.data.stream
                found.add(f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base)
    return {m for m in found if m == ROOT_PACKAGE or m.startswith(f"{ROOT_PACKAGE}.")}


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path.read_text(), module_name(path), path.name == "__init__.py")
            for path in sorted((ROOT / ROOT_PACKAGE).rglob("*.py")) if "__pycache__" not in path.parts}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
            for module, targets in graph.items() for target in sorted(targets) if layer(target) > layer(module)]


def package_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Loops in the graph of LAYERS entries (packages and top-level modules), e.g. data -> models -> data."""
    edges: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges.setdefault(room(module), set()).update(room(t) for t in targets if room(t) != room(module))
    cycles = set()

    def visit(path: list[str]) -> None:
        for target in sorted(edges.get(path[-1], ())):
            if target in path:
                loop = path[path.index(target):]
                start = loop.index(min(loop))  # one spelling per loop, whichever node it was found from
                cycles.add(" -> ".join([*loop[start:], *loop[:start], min(loop)]))
            else:
                visit([*path, target])

    for start in sorted(edges):
        visit([start])
    return sorted(cycles)


def test_every_module_has_a_layer():
    unplaced = [module for module in import_graph() if room(module) is None]
    assert not unplaced, f"{unplaced}: put each in the package of its layer, or give it a layer in LAYERS"


def test_imports_only_point_down():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles_between_packages():
    assert package_cycles(import_graph()) == []


def test_the_checks_see_function_local_relative_and_upward_imports():
    source = ("from deit_train.errors import ConfigError\n"
              "from . import stream\n"
              "from ..models import deit\n"
              "def late():\n"
              "    from deit_train.run import config\n"
              "    import deit_train.teacher.cache\n")
    found = imported_modules(source, "deit_train.data.recipes")
    assert found == {"deit_train.errors", "deit_train.data.stream", "deit_train.models.deit",
                     "deit_train.run.config", "deit_train.teacher.cache"}
    assert upward_imports({"deit_train.data.recipes": found}) == [
        "deit_train.data.recipes (layer 1) imports deit_train.run.config (layer 4)",
        "deit_train.data.recipes (layer 1) imports deit_train.teacher.cache (layer 2)"]
    loop = {"deit_train.data.stream": {"deit_train.models.deit"}, "deit_train.models.deit": {"deit_train.losses"},
            "deit_train.losses": {"deit_train.data.samplers"}}
    assert package_cycles(loop) == ["deit_train.data -> deit_train.models -> deit_train.losses -> deit_train.data"]
    assert room("deit_train.newthing") is None and room("deit_train") == "deit_train"
    # and the real graph holds a function-local import: run/preflight.py reads HF folders only when asked
    assert "deit_train.models.hf_convert" in import_graph()["deit_train.run.preflight"]
