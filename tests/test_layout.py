"""The package's shape: the folders are the stages of the data flow, imports flow one way
(down the layers, no cycle), config is a leaf, no module shadows a public name, a public name
is defined once, and each zoo stage is keyed on all the code it runs."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import opd
from opd.lab.zoo import RL_CODE, SFT_CODE
from opd.source import code_files, imported_modules

SRC = Path(opd.__file__).parent

LAYERS = (
    ("opd.version", "opd.errors", "opd.io", "opd.metrics", "opd.runtime", "opd.source", "opd.config"),
    ("opd.data",),
    ("opd.models",),
    ("opd.step",),
    ("opd.teachers", "opd.evaluation"),
    ("opd.run",),
    ("opd.doctor", "opd.recipes", "opd.lab", "opd.study"),
    ("opd.api", "opd.cli", "opd.__main__"),
)
"""The data flow, bottom up: shared leaves and settings → prompts → models → the step (rollouts,
scoring, objectives, measures) → teachers and evaluation → the run (loop, checkpoints, logs,
reports) → the verbs built on it → the API and the CLI. A module imports only from its own
layer or those below."""


def all_modules() -> list[str]:
    names = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def import_graph() -> dict[str, set[str]]:
    """Module → the opd modules it imports, at the top or inside functions."""
    return {name: imported_modules(name) for name in all_modules()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in graph:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, pending = set(), [start]
    while pending:
        node = pending.pop()
        if node not in seen:
            seen.add(node)
            pending += graph.get(node, ())
    return seen - {start}


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def layer_of(module: str) -> int:
    for index, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS")


def test_every_module_is_in_a_layer_and_the_folders_are_the_layers():
    for module in all_modules():
        if module != "opd":
            layer_of(module)
    tops = {p.name.removesuffix(".py") for p in SRC.iterdir()
            if p.suffix == ".py" or (p / "__init__.py").exists()} - {"__init__"}
    named = {m.split(".")[1] for members in LAYERS for m in members}
    assert tops == named


def test_imports_flow_down_the_layers():
    upward = [f"{module} → {target}" for module, targets in import_graph().items() if module != "opd"
              for target in targets if layer_of(target) > layer_of(module)]
    assert not upward, upward


def test_config_is_a_leaf():
    """Settings are read without importing what implements them: choice lists live in
    opd.config.choices."""
    graph = import_graph()
    for module in graph:
        if module.startswith("opd.config"):
            allowed = {"opd.errors", "opd.io", *(m for m in graph if m.startswith("opd.config"))}
            assert reaches(graph, module) <= allowed, module


def test_no_module_shadows_a_public_name():
    tops = {p.name.removesuffix(".py") for p in SRC.iterdir()}
    assert not tops & set(opd.__all__)


def test_the_loop_does_not_reach_the_hooks_or_reports():
    below = reaches(import_graph(), "opd.run.loop")
    for module in ("opd.run.report", "opd.run.hooks", "opd.run.trackers"):
        assert module not in below, module


def test_verbs_are_registered_one_way():
    graph = import_graph()
    for module in ("opd.cli.recipes", "opd.cli.diagnose", "opd.cli.lab"):
        assert module in graph["opd.cli"]
        assert "opd.cli" not in reaches(graph, module)


def test_each_zoo_stage_is_keyed_on_the_code_it_runs():
    sft = {p.relative_to(SRC).as_posix() for p in code_files(SFT_CODE)}
    rl = {p.relative_to(SRC).as_posix() for p in code_files(RL_CODE)}
    assert {"run/sft.py", "run/optim.py", "lab/world.py", "evaluation/accuracy.py",
            "step/rollout.py"} <= sft
    assert {"run/loop.py", "config/training.py", "step/objectives.py", "step/scoring.py",
            "step/measures.py", "config/settings.py", "run/monitor.py"} <= rl
    assert "run/loop.py" not in sft and sft < rl


def test_design_md_names_every_module():
    design = (SRC.parents[1] / "docs" / "design.md").read_text()
    missing = [m for m in all_modules() if m.count(".") >= 1 and not m.endswith("__main__")
               and f"`{m}`" not in design and f"`{m.rsplit('.', 1)[0]}` (" not in design]
    assert not missing, missing


def test_the_api_is_the_top_layer():
    """Only the package (on first use of a public name) and the verbs import opd.api."""
    graph = import_graph()
    importers = {module for module, imports in graph.items() if "opd.api" in imports}
    assert importers <= {"opd", "opd.cli", "opd.cli.recipes", "opd.cli.diagnose", "opd.cli.lab"}
    assert not any(m.startswith("opd.cli") for m in reaches(graph, "opd.api"))


def test_no_test_module_imports_another():
    """Helpers that test modules share live in tests/support.py, fixtures in conftest.py."""
    root = Path(__file__).parents[1]
    for folder in ("tests", "tests_vllm", "tests_reproduce", "tests_real"):
        for path in sorted((root / folder).rglob("*.py")):
            imported = []
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    imported += [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    imported += [f"{node.module}.{alias.name}" for alias in node.names]
            tests = [name for name in imported if any(part.startswith("test_")
                                                      for part in name.split("."))]
            assert not tests, f"{path.relative_to(root)} imports {tests}"
PER_MODULE_NAMES = {"register", "markdown", "write_report", "evaluate"}
"""Names several modules define on purpose, each for itself and meaning the same: a CLI
module's `register`, a verb's report `markdown` and `write_report`, and `evaluate` (avg@n
accuracy: of a model in memory in opd.evaluation, of a model folder in the API)."""


def test_each_public_class_or_function_is_defined_once():
    defined: dict[str, list[str]] = defaultdict(list)
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef) and not node.name.startswith("_"):
                defined[node.name].append(str(path.relative_to(SRC)))
    twice = {name: where for name, where in defined.items()
             if len(where) > 1 and name not in PER_MODULE_NAMES}
    assert not twice
