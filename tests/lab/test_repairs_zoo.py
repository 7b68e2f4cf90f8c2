"""The repair tools on the quick zoo: the live monitor stops an OPD run from the foreign
teacher and stays quiet with the aligned one; the cold start raises the starting overlap."""

from __future__ import annotations

import json

from opd.config import build_config
from opd.lab.world import max_new_tokens
from opd.metrics import read as load_metrics
from opd.recipes.cold_start import run_cold_start
from opd.train import run_training


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
    assert [a["rule"] for a in foreign["alerts"]] == ["pattern-mismatch"]
    aligned = run_training(opd_config(root, "teacher-aligned", tmp_path / "aligned",
                                      max_steps=24, on_failure="stop"))
    assert aligned["stopped_early_at"] is None and aligned["alerts"] == []


def test_cold_start_raises_the_starting_overlap_with_the_foreign_teacher(quick_zoo, tmp_path):
    root, _ = quick_zoo
    prompts = tmp_path / "cold-prompts.jsonl"
    rows = (root / "data" / "teacher-train.jsonl").read_text().splitlines()[:400]
    prompts.write_text("\n".join(rows) + "\n")
    plain = run_training(opd_config(root, "teacher-foreign", tmp_path / "plain", max_steps=1))
    config = opd_config(root, "teacher-foreign", tmp_path / "cold", max_steps=1, cold_start={
        "prompts": str(prompts), "samples_per_prompt": 2, "max_attempts": 1, "sft_steps": 200,
        "sft_lr": 1e-3, "sft_batch_size": 64})
    report = run_cold_start(config)
    data = [json.loads(line) for line in (tmp_path / "cold" / "teacher_data.jsonl").open()]
    assert data and all(row["correct"] for row in data)  # verified answers only
    assert all(row["response"].startswith("col") for row in data)  # the teacher's dialect (B)
    before = load_metrics(tmp_path / "plain")[0]["overlap_ratio"]
    after = load_metrics(tmp_path / "cold" / "opd")[0]["overlap_ratio"]
    assert after > before + 0.1, (before, after)
    assert plain["steps"] == report["opd"]["steps"] == 1
