"""`opd select-prompts`: flags → SelectConfig → run_select_prompts → files and a short summary."""

from __future__ import annotations

import argparse
from typing import Any

from opd.recipes.select_prompts import RANKABLE, SelectConfig


def cmd_select_prompts(args: argparse.Namespace) -> int:
    from opd.config import parse_set
    from opd.recipes.select_prompts import run_select_prompts

    config = SelectConfig(
        student=args.student, teacher=args.teacher, prompts=args.prompts, out=args.out,
        template=args.template, student_template=args.student_template,
        teacher_template=args.teacher_template, keep_fraction=args.keep_fraction,
        mix_share=args.mix_share, other_prompts=args.other_prompts,
        rank_by=tuple(m.strip() for m in args.rank_by.split(",") if m.strip()),
        num_prompts=args.num_prompts, n=args.n, max_new_tokens=args.max_new_tokens, k=args.k,
        trial_steps=args.trial_steps, trial_profile=args.trial_profile,
        trial_settings=parse_set(args.trial_set), seed=args.seed, batch_size=args.batch_size,
        dtype=args.dtype, progress=not args.no_progress,
    )
    selection = run_select_prompts(config)
    step0 = selection["step0"]
    rows = [("student template", step0["student_template"]), ("teacher template", step0["teacher_template"]),
            ("selected (fresh rollouts)", step0["fresh_rollouts"]["selected"]),
            ("output (fresh rollouts)", step0["fresh_rollouts"]["output"])]
    print(f"step-0 overlap ratio (top-{selection['k']}):")
    for name, values in rows:
        print(f"  {name:<28}{values['overlap_ratio']:.3f}")
    effect = (selection["trial"] or {}).get("entropy_effect")
    if effect is not None:
        print(f"trial: student entropy on selected minus unselected prompts {effect:+.3f}")
    counts = selection["counts"]
    print(f"kept {counts['kept']} of {counts['candidates']}, mixed in {counts['mixed_in']}: "
          f"wrote {args.out}/prompts.jsonl, selection.json, report.md, selection.png; train with "
          f"--config {args.out}/train.yaml (template \"{{prompt}}\", teacher_prompt student)")
    return 0


def register(verbs: Any, parent: argparse.ArgumentParser) -> None:
    """Add `opd select-prompts` (its own flags; the training parent is not needed)."""
    defaults = SelectConfig(student="", teacher="", prompts="", out="")
    p = verbs.add_parser(
        "select-prompts", help="teacher-aligned prompts: teacher template, ranked content (SPEC §6.2)",
        description="Render candidate prompts with the teacher's template, rank them by the step-0 "
                    "alignment measures on the student's rollouts, keep the top fraction, mix in a "
                    "share of other prompts, and run a short OPD trial to show the student-entropy "
                    "effect. Writes prompts.jsonl, selection.json, train.yaml, report.md and "
                    "selection.png to --out.",
    )
    p.add_argument("--student", required=True, help="student model folder (or hub id)")
    p.add_argument("--teacher", required=True, help="teacher model folder (or hub id)")
    p.add_argument("--prompts", required=True, help="candidate prompts (.jsonl or .parquet)")
    p.add_argument("--out", required=True, help="output folder (must not hold a selection)")
    p.add_argument("--template", default=defaults.template, choices=("teacher", "student"),
                   help="whose prompt template the output prompts are rendered with")
    p.add_argument("--student-template", default=None, help="format string with {prompt} instead of "
                                                            "the student tokenizer's chat template")
    p.add_argument("--teacher-template", default=None, help="format string with {prompt} instead of "
                                                            "the teacher tokenizer's chat template")
    p.add_argument("--keep-fraction", type=float, default=defaults.keep_fraction,
                   help="share of the candidates kept, best first, in (0, 1]")
    p.add_argument("--mix-share", type=float, default=defaults.mix_share,
                   help="share of the output made of other prompts, in [0, 1)")
    p.add_argument("--other-prompts", default=None,
                   help="prompts to mix in (default: the candidates not kept)")
    p.add_argument("--rank-by", default=",".join(defaults.rank_by),
                   help=f"comma-separated measures, several = mean percentile rank; of {', '.join(RANKABLE)}")
    p.add_argument("--num-prompts", type=int, default=defaults.num_prompts,
                   help="candidates sampled (seeded) from --prompts")
    p.add_argument("--n", type=int, default=defaults.n, help="student rollouts per candidate")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--k", type=int, default=defaults.k, help="top-k of the overlap measures")
    p.add_argument("--trial-steps", type=int, default=defaults.trial_steps,
                   help="OPD steps of the trial on each prompt set (0 = no trial)")
    p.add_argument("--trial-profile", default=defaults.trial_profile,
                   help="defaults profile of the trial runs: study or cpu-small")
    p.add_argument("--trial-set", action="append", default=[], metavar="KEY=VALUE",
                   help="any training config field for the trial runs (repeatable)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--dtype", default=defaults.dtype, help="auto, float32, bfloat16 or float16")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_select_prompts)
