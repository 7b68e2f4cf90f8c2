"""The repair tools on the quick zoo: the live monitor stops an OPD run from the foreign
teacher and stays quiet with the aligned one (the cold start: test_cold_start_zoo.py)."""

from __future__ import annotations

from opd.config.training import build_config
from opd.lab.world import max_new_tokens
from opd.run.loop import run_training


def opd_config(root, teacher, out, **extra):
    return build_config({
        "student": str(root / "student"), "teacher": str(root / teacher),
        "prompts": str(root / "data" / "teacher-train.jsonl"), "out": str(out),
        "max_new_tokens": max_new_tokens(2), "progress": False, **extra,
    }, profile="cpu-small")


def test_monitor_stops_the_foreign_run_and_lets_the_aligned_one_go(quick_zoo, tmp_path):
    root, _ = quick_zoo
    foreign = run_training(opd_config(root, "teacher-foreign", tmp_path / "foreign",
                                      max_steps=30, on_failure="stop"))
    assert foreign["stopped_early_at"] == 16  # the first step it judges (two windows of 8)
    # The stop is for the pattern; whether the tail's entropy has also risen by step 16 moves
    # with the CPU's kernels (it had on the 2026-12-02 machine), and it does not stop alone.
    assert "pattern-mismatch" in [a["rule"] for a in foreign["alerts"]]
    aligned = run_training(opd_config(root, "teacher-aligned", tmp_path / "aligned",
                                      max_steps=24, on_failure="stop"))
    assert aligned["stopped_early_at"] is None and aligned["alerts"] == []

