"""`opd demo --quick` on the quick zoo: the withheld sub-skill rises well beyond noise, and the
run folder holds what the README promises."""

from __future__ import annotations

import json
import math

import pytest

from opd import metrics as M
from opd.cli import main
from opd.lab.demo import overlap_change, run_demo


def test_quick_demo_teaches_the_withheld_sub_skill(quick_zoo, tmp_path):
    root, _ = quick_zoo
    out = tmp_path / "demo"
    result = run_demo(out, root, profile="quick", progress=False)
    chain = result["accuracy"]["eval-chain-d2"]
    # Binomial standard error of the 'before' accuracy on these prompts; ask for 5 of them.
    se = math.sqrt(max(chain["before"] * (1 - chain["before"]), 0.25 / chain["prompts"])
                   / chain["prompts"])
    assert chain["after"] - chain["before"] > 5 * se
    assert result["accuracy"]["eval-nochain-d2"]["after"] > 0.8  # the student's own skill stays
    for name in ("metrics.jsonl", "report.md", "demo.md", "demo.json", "curves.png",
                 "entropy_heatmap.png"):
        assert (out / name).exists(), name
    assert json.loads((out / "demo.json").read_text())["steps"] == 40
    assert "| eval-chain-d2 | 150 |" in (out / "demo.md").read_text()
    # How far the overlap moved, from the run's own metrics, and why, in the zoo's world.
    overlap = result["overlap"]
    assert overlap == {**overlap_change(M.read(out)), "k": 8, "world": "addition"}
    assert f"went {overlap['first']:.3f} → {overlap['last']:.3f}" in (out / "demo.md").read_text()
    assert "opd demo --choice" in (out / "demo.md").read_text()


def test_overlap_change_compares_the_first_and_last_windows():
    records = [{M.OVERLAP_RATIO: v} for v in (0.1, 0.3, None, 0.5, 0.6, 0.9)]
    assert overlap_change(records, window=2) == pytest.approx(
        {"first": 0.2, "last": 0.75, "change": 0.55, "window": 2})


def test_demo_refuses_quick_and_choice_together(capsys):
    assert main(["demo", "--quick", "--choice"]) == 2
    assert "choose one of --quick and --choice" in capsys.readouterr().err
