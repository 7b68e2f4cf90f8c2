"""The `opd diagnose` verb: flags → DiagnoseConfig → measure → table, diagnosis.json, report."""

from __future__ import annotations

import argparse
from typing import Any

from opd.diagnose.measure import DiagnoseConfig, parse_depths


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def cmd_diagnose(args: argparse.Namespace) -> int:
    from opd.diagnose.measure import run_diagnosis
    from opd.diagnose.report import print_table, write_outputs

    config = DiagnoseConfig(
        student=args.student, teacher=args.teacher, prompts=args.prompts, teacher2=args.teacher2,
        student_template=args.student_template, teacher_template=args.teacher_template,
        teacher_prompt=args.teacher_prompt, num_prompts=args.num_prompts, n=args.n,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        capability_temperature=args.capability_temperature,
        depths=parse_depths(args.depths), ks=_ints(args.k), verifier=args.verifier, seed=args.seed,
        batch_size=args.batch_size, dtype=args.dtype, train_steps=args.train_steps,
        train_rollouts=args.train_rollouts, progress=not args.no_progress,
    )
    diagnosis = run_diagnosis(config)
    out = write_outputs(diagnosis, args.out)
    print_table(diagnosis)
    print(f"wrote {out / 'diagnosis.json'} and {out / 'report.md'}")
    return 0


def register(verbs: Any, parent: argparse.ArgumentParser) -> None:
    """Add `opd diagnose` (its own flags; the training parent is not needed)."""
    defaults = DiagnoseConfig(student="", teacher="", prompts="")
    p = verbs.add_parser(
        "diagnose", help="before training: will OPD work for this pair, why, and what to do",
        description="Measure thinking-pattern compatibility, teacher novelty from the student's "
                    "states, the template, the horizon and the global signal on the student's own "
                    "rollouts; print a verdict (go, pattern-mismatch, no-novelty, horizon-risk) and "
                    "write diagnosis.json, report.md and figures to --out.",
    )
    p.add_argument("--student", help="student model folder (or hub id)")
    p.add_argument("--teacher", help="teacher model folder (or hub id)")
    p.add_argument("--teacher2", default=None, help="optional second teacher, compared with the first")
    p.add_argument("--prompts", help="the prompt file you plan to train on (.jsonl or .parquet); "
                                     "an 'answer' per row enables the accuracy checks")
    p.add_argument("--out", default="diagnosis", help="output folder (default: ./diagnosis)")
    p.add_argument("--student-template", default=None, help="format string with {prompt} instead of "
                                                            "the student tokenizer's chat template")
    p.add_argument("--teacher-template", default=None, help="format string with {prompt} instead of "
                                                            "the teacher tokenizer's chat template")
    p.add_argument("--teacher-prompt", default=defaults.teacher_prompt, choices=("student", "own"),
                   help="how OPD will show the prompt to the teacher (config teacher_prompt)")
    p.add_argument("--num-prompts", type=int, default=defaults.num_prompts)
    p.add_argument("--n", type=int, default=defaults.n, help="student rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--temperature", type=float, default=defaults.temperature,
                   help="rollout temperature, as in training")
    p.add_argument("--capability-temperature", type=float, default=defaults.capability_temperature,
                   help="decoding of continuations and the teacher's own attempts (0 = greedy)")
    p.add_argument("--top-p", type=float, default=defaults.top_p)
    p.add_argument("--depths", default=",".join(f"{d:g}" for d in defaults.depths),
                   help="cuts of each rollout for continuations: below 1 a share of the response, "
                        "from 1 up a token count (default: %(default)s)")
    p.add_argument("--k", default=",".join(map(str, defaults.ks)), help="top-k sizes of the overlap measures")
    p.add_argument("--verifier", default=defaults.verifier, help="exact or math")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--dtype", default=defaults.dtype, help="auto, float32, bfloat16 or float16")
    p.add_argument("--train-steps", type=int, default=defaults.train_steps,
                   help="steps of the training run being judged (for the cost share)")
    p.add_argument("--train-rollouts", type=int, default=defaults.train_rollouts,
                   help="rollouts per step of that run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_diagnose)
