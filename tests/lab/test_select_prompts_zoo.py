"""`opd select-prompts` on the quick zoo, run as a user would: the student and the teacher
post-trained with template 2, candidates from the teacher's kind of data. The teacher's template
raises the step-0 overlap, and the selected prompts raise it further (on fresh rollouts)."""

from __future__ import annotations

import json

from opd.cli import main
from opd.lab.world import max_new_tokens


def test_teacher_template_then_selection_raise_the_step0_overlap(quick_zoo, tmp_path):
    root, _ = quick_zoo
    out = tmp_path / "select"
    args = ["select-prompts", "--student", str(root / "student"),
            "--teacher", str(root / "teacher-aligned-template2"),
            "--prompts", str(root / "data" / "teacher-train.jsonl"), "--out", str(out),
            "--num-prompts", "128", "--max-new-tokens", str(max_new_tokens(3)),
            "--trial-steps", "6", "--trial-profile", "cpu-small", "--no-progress"]
    assert main(args) == 0
    selection = json.loads((out / "selection.json").read_text())
    step0 = selection["step0"]
    student, teacher = step0["student_template"], step0["teacher_template"]
    fresh = step0["fresh_rollouts"]
    numbers = {"student template": student["overlap_ratio"], "teacher template": teacher["overlap_ratio"],
               "all candidates (fresh)": fresh["all_candidates"]["overlap_ratio"],
               "selected (fresh)": fresh["selected"]["overlap_ratio"]}
    assert teacher["overlap_ratio"] > student["overlap_ratio"], numbers
    assert fresh["selected"]["overlap_ratio"] > fresh["all_candidates"]["overlap_ratio"], numbers
    assert fresh["selected"]["overlap_ratio"] > teacher["overlap_ratio"], numbers
    rows = (out / "prompts.jsonl").read_text().splitlines()
    assert all(json.loads(r)["prompt"].startswith("<bos> question : add") for r in rows)
    trial = selection["trial"]
    assert trial["selected"]["steps"] == trial["unselected"]["steps"] == 6
