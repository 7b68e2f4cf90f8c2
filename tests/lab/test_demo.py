"""`opd demo --quick` on the quick zoo: the withheld sub-skill rises well beyond noise, and the
run folder holds what the README promises."""

from __future__ import annotations

import json
import math

from opd.lab.demo import run_demo


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
