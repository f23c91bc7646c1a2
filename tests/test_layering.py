"""The package's layers import one way, with no cycles, and no source file grows past 400 lines.

Read from the source with `ast`, nothing is run.

averaging, errors  the one averaging law (a package: the registry of rules) and the error types: pure Python
io                 files and the Hub: no torch
merging            the offline merger, on io and averaging, and the torch-free scopes core: no torch
online             the engine on the optimizer: torch, no transformers
soups              greedy and learned soups, LoRA averaging, weighted sums, buffers, the torch front-end of
                   scopes (on merging, online, io)
tools              sweeps (a package: candidates, scorers, reports, run) and their scorers, the FusionBench-style
                   class (on merging, online, io)
training           the transformers glue: PmaArguments, the callbacks (PMA, spike recovery, WSA), the trainer
cli                the `pmakit` command (a package: one module a subcommand, the merge flags, the exits)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest


SRC = Path(__file__).resolve().parents[1] / "src" / "pmakit"

LAYER_OF_PACKAGE = {
    "averaging": "core",
    "io": "io",
    "merging": "merging",
    "online": "online",
    "soups": "soups",
    "tools": "tools",
    "training": "training",
    "cli": "cli",
}
LAYER_OF_MODULE = {
    "errors": "core",
    "settings": "core",
    "deprecation": "core",
    "lazy": "core",
    "__init__": "api",
    "__main__": "cli",
}
MAY_IMPORT = {
    "core": {"core"},
    "io": {"core", "io"},
    "merging": {"core", "io", "merging"},
    "online": {"core", "online"},
    # soups and tools sit side by side on merging/online, neither importing the other
    "soups": {"core", "io", "merging", "online", "soups"},
    "tools": {"core", "io", "merging", "online", "tools"},
    "training": {"core", "io", "online", "soups", "tools", "training"},
    # cli -> tools for `pmakit sweep` only, imported on that path (scoring needs torch; no module of
    # the cli package imports anything heavy, even lazily).
    "cli": {"core", "io", "merging", "tools", "cli"},
    "api": {"core", "io", "merging", "online", "soups", "tools", "training", "cli", "api"},
}
HEAVY = {"torch", "transformers", "accelerate", "peft", "trl", "deepspeed"}
NEVER = {
    "core": HEAVY,
    "io": HEAVY,
    "merging": HEAVY,
    "online": {"transformers", "peft", "trl"},
    "cli": HEAVY,
}


# Open work, named so it cannot be forgotten (module -> heavy imports it still makes). Empty: `.bin`, DCP and
# ZeRO inputs are read by pmakit.io.torch_pickle, without torch.
KNOWN_GAPS: dict[str, set[str]] = {}

MAX_LINES = 400
# Source files (under src/pmakit) still over MAX_LINES, named so the list can only shrink (empty now: keep it so):
# a file not listed may not pass the limit.
TOO_LONG: set[str] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(name: str) -> bool:
    return (SRC.parent / Path(*name.split("."))).is_dir()


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    return LAYER_OF_PACKAGE.get(parts[1]) or LAYER_OF_MODULE[parts[1]]


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:`` (they never run)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            lines |= {n.lineno for body in node.body for n in ast.walk(body) if hasattr(n, "lineno")}
    return lines


def imports_of(module: str, type_checking: bool = False) -> tuple[set[str], set[str]]:
    """(modules of pmakit, top-level third-party packages) that ``module`` imports, lazily or not.

    Imports under ``if TYPE_CHECKING:`` are left out unless ``type_checking``: they never run, but an
    annotation import is still a dependency, so the cycle check counts them.
    """
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set() if type_checking else _type_checking_only(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    internal, external = set(), set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [(base, [alias.name for alias in node.names])]
        else:
            continue
        for name, names in targets:
            if not name.startswith("pmakit"):
                external.add(name.split(".")[0])
                continue
            subs = [f"{name}.{n}" for n in names if f"{name}.{n}" in MODULES] if _is_package(name) else []
            internal.update(subs or [name])
    internal.discard(module)
    return internal, external


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_sits_in_a_layer():
    for module in MODULES:
        assert layer(module) in MAY_IMPORT, module


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_down_the_layers(module):
    internal, external = GRAPH[module]
    upward = sorted(m for m in internal if layer(m) not in MAY_IMPORT[layer(module)])
    assert not upward, f"{module} ({layer(module)}) imports {upward} from a layer it may not use"
    heavy = sorted(external & NEVER.get(layer(module), set()) - KNOWN_GAPS.get(module, set()))
    assert not heavy, f"{module} ({layer(module)}) imports {heavy}"


def _find_cycle(graph: dict[str, tuple[set[str], set[str]]]) -> list[str] | None:
    """The first import cycle among the modules below the api layer (depth-first), or None."""
    edges = {m: {t for t in graph[m][0] if t in MODULES and layer(t) != "api"} for m in MODULES if layer(m) != "api"}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


TYPED_GRAPH = {m: imports_of(m, type_checking=True) for m in MODULES}


def test_no_import_cycles_even_through_annotations():
    """An import under ``if TYPE_CHECKING:`` is a dependency too: a cycle through one is still a cycle."""
    cycle = _find_cycle(TYPED_GRAPH)
    assert cycle is None, "import cycle (annotation imports included): " + " -> ".join(cycle or [])


def _imported_by(module: str, graph: dict) -> set[str]:
    """Every module that ``module`` imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        for nxt in graph[todo.pop()][0]:
            if nxt in MODULES and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_backend_adapters_sit_on_the_engine():
    """The engine knows no backend: DeepSpeed's adapter imports the engine, never the reverse (annotations too)."""
    engine = "pmakit.online.engine"
    below = _imported_by(engine, TYPED_GRAPH)
    assert "pmakit.online.deepspeed" not in below
    assert not [m for m in below if engine in TYPED_GRAPH[m][0]], "the engine imports a module that imports it"
    assert engine in TYPED_GRAPH["pmakit.online.deepspeed"][0]


def test_the_checker_sees_annotation_imports():
    assert "pmakit.io.safetensors" in TYPED_GRAPH["pmakit.merging.sources"][0]  # under `if TYPE_CHECKING:` only
    assert "pmakit.io.safetensors" not in GRAPH["pmakit.merging.sources"][0]
    cycle = _find_cycle({**TYPED_GRAPH, "pmakit.online.engine": ({"pmakit.online.deepspeed"}, set())})
    assert cycle is not None and "pmakit.online.deepspeed" in cycle


def test_the_checker_sees_lazy_and_relative_imports():
    internal, external = GRAPH["pmakit.merging.merger"]
    assert "pmakit.io.hub" in internal  # imported inside a function
    assert {"pmakit.merging.options", "pmakit.merging.plan"} <= internal and "yaml" in external
    assert "torch" in GRAPH["pmakit.online.engine"][1] and "transformers" in GRAPH["pmakit.training.trainer"][1]
    # the averaging package: each of its modules is checked, and the rules sit on the registry
    assert {"pmakit.averaging.registry", "pmakit.averaging.rules"} <= GRAPH["pmakit.averaging"][0]
    assert "pmakit.averaging.registry" in GRAPH["pmakit.averaging.rules"][0]
    assert layer("pmakit.averaging.rules") == "core"


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_no_source_file_is_over_the_line_limit():
    sizes = {p.relative_to(SRC).as_posix(): _lines(p) for p in sorted(SRC.rglob("*.py"))}
    over = {name: n for name, n in sizes.items() if n > MAX_LINES and name not in TOO_LONG}
    assert not over, f"over {MAX_LINES} lines: {over}; split them (short modules along a natural seam)"
    fixed = sorted(name for name in TOO_LONG if sizes.get(name, 0) <= MAX_LINES)
    assert not fixed, f"{fixed} are within {MAX_LINES} lines now (or gone): delete them from TOO_LONG"


def test_soups_and_training_hold_the_moved_tools():
    assert layer("pmakit.soups.greedy") == "soups" and layer("pmakit.training.spike") == "training"
    assert "pmakit.soups.weighted_sum" in GRAPH["pmakit.training.spike"][0]
    assert "pmakit.merging.scopes" in GRAPH["pmakit.soups.scopes"][0]  # the torch front-end on the one core
    assert not any(m.startswith("pmakit.tools.") for m in GRAPH["pmakit.training.wsa"][0])


def test_only_the_sweep_scorers_import_torch():
    """`import pmakit.tools.sweep` stays light: candidates, reports and the run import nothing heavy, even lazily;
    the scorers import torch and transformers inside the functions that score."""
    for module in ("pmakit.tools.sweep", *(f"pmakit.tools.sweep.{m}" for m in ("candidates", "reports", "run"))):
        assert not GRAPH[module][1] & HEAVY, (module, GRAPH[module][1] & HEAVY)
    assert {"torch", "transformers"} <= GRAPH["pmakit.tools.sweep.scorers"][1]


def test_the_cli_is_a_package_that_imports_nothing_heavy():
    """`pmakit --version` stays light: every module of the cli package is checked, lazy imports included."""
    cli = sorted(m for m in MODULES if m == "pmakit.cli" or m.startswith("pmakit.cli."))
    assert {"pmakit.cli.merge", "pmakit.cli.sweep", "pmakit.cli.exits"} <= set(cli)
    assert all(layer(m) == "cli" and not GRAPH[m][1] & HEAVY for m in cli)
