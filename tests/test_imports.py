"""The house's import map: no cycle among the package's imports (module-level or inside
functions), the command-line layer imported by nothing below it, and the product apart from
the study: nothing in ``lfgraph`` imports ``lfgraph_study`` (checked by reading the source,
not by importing it)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lfgraph"
STUDY = ROOT / "lfgraph_study"
#: Modules that run commands; the pipeline is theirs to import, and nothing imports them but the CLI.
COMMANDS = {"lfgraph.cli", "lfgraph.retrain.cli", "lfgraph.deploy.cli", "lfgraph.visualize.command"}


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for f in package.rglob("*.py"):
        parts = f.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _targets(module: str, is_package: bool, node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The lfgraph modules an import statement loads (``from . import x`` loads ``pkg.x``)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    assert isinstance(node, ast.ImportFrom)
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules}
    others = [a for a in node.names if f"{mod}.{a.name}" not in modules]
    return subs | ({mod} if others and mod in modules else set())


def import_graph(module_level_only: bool, package: Path = PACKAGE) -> nx.DiGraph:
    modules = _modules(package)
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = tree.body if module_level_only else list(ast.walk(tree))
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _targets(name, path.name == "__init__.py", node, modules) - {name}:
                    g.add_edge(name, t)
    return g


def test_no_cycle_among_module_level_imports():
    cycles = list(nx.simple_cycles(import_graph(module_level_only=True)))
    assert cycles == [], cycles[:5]


def test_no_cycle_among_imports_inside_functions_either():
    # 23 before the study left the package, all among the comparison methods (lfgraph_study.baselines)
    cycles = list(nx.simple_cycles(import_graph(module_level_only=False)))
    assert cycles == [], cycles[:5]


def test_no_cycle_among_the_studys_imports_either():
    for module_level_only in (True, False):
        cycles = list(nx.simple_cycles(import_graph(module_level_only, STUDY)))
        assert cycles == [], cycles[:5]


def test_the_product_never_imports_the_study():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            wrong += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "lfgraph_study"]
        # an import by name (importlib, __import__) would dodge the statements above
        text = path.read_text(encoding="utf-8")
        wrong += [f"{path.relative_to(ROOT)}: names lfgraph_study in an import call"
                  for call in ("import_module(\"lfgraph_study", "__import__(\"lfgraph_study", "import_module('lfgraph_study", "__import__('lfgraph_study")
                  if call in text]
    assert wrong == [], wrong


def test_the_command_layer_is_imported_from_above_only():
    g = import_graph(module_level_only=False)
    wrong = sorted((a, b) for a, b in g.edges if b in COMMANDS and a not in COMMANDS)
    assert wrong == [], wrong
    # the pipeline is the commands' (the research loops that drive whole runs are lfgraph_study's)
    users = {a for a, b in g.edges if b == "lfgraph.pipeline"}
    assert users <= COMMANDS, users


#: The layers the README draws, top to bottom: the commands, the public API, compress's
#: stages, what the stages share (planning, sources, outputs), and below them everything else
#: (the registries, frontends, passes, graph, plan, models, architectures, export, deploy…).
LAYERS = (
    COMMANDS,
    {"lfgraph.pipeline"},
    {"lfgraph.stages"},
    {"lfgraph.planning", "lfgraph.sources", "lfgraph.outputs"},
)


def _layer(module: str) -> int:
    return next((i for i, members in enumerate(LAYERS) if module in members), len(LAYERS))


def test_no_upward_import_between_the_layers():
    """A module imports only from its own layer or below (imports inside functions included)."""
    g = import_graph(module_level_only=False)
    wrong = sorted((a, b) for a, b in g.edges if a.startswith("lfgraph.") or a == "lfgraph"
                   if _layer(b) < _layer(a))
    assert wrong == [], wrong
