"""`opd cold-start` and `opd select-prompts`: the recipes for failing OPD runs as verbs."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from opd.config import settings
from opd.config.training import TrainConfig
from opd.io import fmt
from opd.recipes.select_prompts import SelectConfig
from opd.runtime import is_main_process


def cmd_cold_start(config: TrainConfig, args: argparse.Namespace) -> int:
    from opd import api

    result = api.cold_start(config=config, resume=args.resume, force=args.force)
    if is_main_process():
        print(json.dumps(result.report, indent=2))
    return 0


def cmd_select_prompts(config: SelectConfig, args: argparse.Namespace) -> int:
    from opd import api

    selection = api.select_prompts(config=config).data
    step0 = selection["step0"]
    rows = [("student template", step0["student_template"]),
            ("teacher template", step0["teacher_template"]),
            ("selected (fresh rollouts)", step0["fresh_rollouts"]["selected"]),
            ("output (fresh rollouts)", step0["fresh_rollouts"]["output"])]
    print(f"step-0 overlap ratio (top-{selection['k']}):")
    for name, values in rows:
        print(f"  {name:<28}{fmt(values['overlap_ratio'])}")
    effect = (selection["trial"] or {}).get("entropy_effect")
    if effect is not None:
        print(f"trial: student entropy on selected minus unselected prompts {fmt(effect, '+.3f')}")
    counts = selection["counts"]
    print(f"kept {counts['kept']} of {counts['candidates']}, mixed in {counts['mixed_in']}: "
          f"wrote {config.out}/prompts.jsonl, selection.json, report.md, selection.png; train "
          f"with --config {config.out}/train.yaml (template \"{{prompt}}\", teacher_prompt student)")
    return 0


def register(verbs: Any, add_training_verb: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `opd cold-start` (a training verb: TrainConfig with its cold_start group) and
    `opd select-prompts`."""
    cold_start = add_training_verb(
        verbs, "cold-start", cmd_cold_start,
        help="off-policy cold start: teacher data → SFT → gate → OPD",
        description="Off-policy cold start: the teacher answers the prompts (verified-correct "
        "answers kept), the student is fine-tuned on them, then OPD runs from that checkpoint. "
        "The first two stages take the cold_start settings (--cold-start.sft-steps …). Each "
        "stage is kept in --out and skipped on --resume once complete. The fine-tuning holds "
        "out a share of the prompts and stops when their loss stops improving; a gate then "
        "measures the student as opd diagnose does and stops before OPD, saying what to change, "
        "when the pattern has not moved.",
    )
    cold_start.add_argument("--force", action="store_true",
                            help="run OPD even when the gate after the fine-tuning fails")
    settings.add_verb(
        verbs, "select-prompts", SelectConfig, cmd_select_prompts,
        help="teacher-aligned prompts: teacher template, ranked content",
        description="Render candidate prompts with the teacher's template, rank them by the "
        "step-0 alignment measures on the student's rollouts, keep the top fraction, mix in a "
        "share of other prompts, and run a short OPD trial to show the student-entropy effect. "
        "Writes prompts.jsonl, selection.json, train.yaml, report.md and selection.png to --out.",
    )
