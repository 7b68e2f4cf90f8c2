"""`opd diagnose` finds the planted property of every pair of the quick zoo, run as a user would
(the CLI, the zoo's folders, the prompt set OPD would train on) with default thresholds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from opd.cli import main
from opd.lab.world import max_new_tokens

PROMPTS = "teacher-train"
"""The prompts OPD would train on; for the RL student, those of its RL stage, where it gained
what its pre-RL checkpoint lacks."""
RL_PROMPTS = "rl-train"


def diagnose(zoo: tuple[Path, dict[str, Any]], student: str, teacher: str, out: Path) -> dict[str, Any]:
    root, _ = zoo
    prompts = RL_PROMPTS if student == "student-rl" else PROMPTS
    args = ["diagnose", "--student", str(root / student), "--teacher", str(root / teacher),
            "--prompts", str(root / "data" / f"{prompts}.jsonl"), "--out", str(out),
            "--max-new-tokens", str(max_new_tokens(3)), "--no-progress"]
    assert main(args) == 0
    return json.loads((out / "diagnosis.json").read_text())


@pytest.mark.parametrize(
    ("student", "teacher", "verdict"),
    [
        ("student", "teacher-aligned", "go"),
        ("student", "teacher-foreign", "pattern-mismatch"),
        ("student", "teacher-same-pipeline", "no-novelty"),
        ("student-rl", "student-prerl", "no-novelty"),
    ],
)
def test_planted_verdicts(quick_zoo, tmp_path, student, teacher, verdict):
    """The zoo plants each property (tests/lab/test_zoo.py pins it); diagnose must find it."""
    diagnosis = diagnose(quick_zoo, student, teacher, tmp_path / "diag")
    assert diagnosis["verdict"] == verdict, diagnosis["teacher"]["decision"]["checks"]
    if teacher == "student-prerl":
        assert any("pull the student back" in w for w in diagnosis["warnings"])
    assert not diagnosis["teacher"]["template"]["applies"]  # one template: nothing to flag


def test_template_check_fires_for_a_teacher_asked_through_the_students_template(quick_zoo, tmp_path):
    diagnosis = diagnose(quick_zoo, "student", "teacher-aligned-template2", tmp_path / "diag")
    template = diagnosis["teacher"]["template"]
    assert template["applies"] and not template["identical"]
    assert diagnosis["teacher"]["decision"]["checks"]["template"]["passed"] is False
    assert any("teacher_prompt: own" in a for a in diagnosis["teacher"]["decision"]["advice"])
