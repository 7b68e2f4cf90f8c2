"""The package's shape: imports flow one way (no cycle), the loop does not reach the layers
above it, and each zoo stage is keyed on all the code it runs."""

from __future__ import annotations

from pathlib import Path

import opd
from opd.lab.zoo import RL_CODE, SFT_CODE, code_files, imported_modules

SRC = Path(opd.__file__).parent


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


def test_the_loop_does_not_reach_recipes_reports_diagnose_or_the_cli():
    below = reaches(import_graph(), "opd.train")
    for layer in ("opd.recipes", "opd.report", "opd.diagnose", "opd.cli", "opd.lab", "opd.api",
                  "opd.hooks", "opd.trackers"):
        assert not any(m == layer or m.startswith(layer + ".") for m in below), layer


def test_verbs_are_registered_one_way():
    graph = import_graph()
    for module in ("opd.recipes.cli", "opd.diagnose.cli", "opd.lab.cli"):
        assert module in graph["opd.cli"]
        assert "opd.cli" not in reaches(graph, module)


def test_each_zoo_stage_is_keyed_on_the_code_it_runs():
    sft = {p.relative_to(SRC).as_posix() for p in code_files(SFT_CODE)}
    rl = {p.relative_to(SRC).as_posix() for p in code_files(RL_CODE)}
    assert {"sft.py", "optim.py", "lab/world.py", "evaluate.py", "rollout.py"} <= sft
    assert {"train.py", "config.py", "objectives.py", "scoring.py", "measures.py",
            "settings.py", "monitor.py"} <= rl
    assert "train.py" not in sft and sft < rl


def test_design_md_names_every_module():
    design = (SRC.parents[1] / "docs" / "design.md").read_text()
    tops = {name.split(".")[1] for name in all_modules() if name.count(".") >= 1}
    missing = [t for t in sorted(tops) if f"`opd.{t}" not in design]
    assert not missing, missing


def test_the_api_is_the_top_layer():
    """Only the package (on first use of a public name) and the verbs import opd.api."""
    graph = import_graph()
    importers = {module for module, imports in graph.items() if "opd.api" in imports}
    assert importers <= {"opd", "opd.cli", "opd.recipes.cli", "opd.diagnose.cli", "opd.lab.cli"}
    assert not any(m.endswith(".cli") for m in reaches(graph, "opd.api"))
