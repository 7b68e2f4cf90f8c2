"""The `opd` command: one verb per job, each a thin layer over the function that does it.

Every verb's flags, YAML (`--config`), `--set` and `--help-config` come from its config
dataclass (`opd.settings`). Bad input prints one line naming the field and the fix (exit 2),
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from opd import settings
from opd.config import PROFILES, TrainConfig
from opd.diagnose import cli as diagnose_cli
from opd.errors import OPDError, one_line
from opd.evaluate import EvalConfig
from opd.lab import cli as lab_cli
from opd.recipes import cli as recipes_cli
from opd.runtime import is_main_process


def print_result(result: dict[str, Any]) -> int:
    """Print a JSON result once, from the main process of a multi-process launch."""
    if is_main_process():
        print(json.dumps(result, indent=2))
    return 0


def cmd_train(config: TrainConfig, args: argparse.Namespace) -> int:
    """`opd train` and `opd grpo`: the loop, the run report, and the cold-start handover when
    the monitor is asked for it."""
    from opd.recipes.cold_start import ColdStartHandover
    from opd.report import ReportHook
    from opd.train import run_training

    hooks = [ReportHook(config.out)]
    if config.on_failure == "cold-start":
        hooks.append(ColdStartHandover(config))
    return print_result(run_training(config, resume=args.resume, hooks=hooks))


def cmd_eval(config: EvalConfig, args: argparse.Namespace) -> int:
    from opd.evaluate import run_eval

    return print_result(run_eval(config))


def cmd_report(args: argparse.Namespace) -> int:
    from opd.report import check_compare_path, check_run_folder, plot_curves, write_run_report

    runs = {run: check_run_folder(run) for run in args.runs}  # every input, before any output
    if args.compare:
        check_compare_path(args.compare)
    for run in args.runs:
        print(write_run_report(run))
    if args.compare:
        Path(args.compare).parent.mkdir(parents=True, exist_ok=True)
        print(plot_curves({Path(r).name: records for r, records in runs.items()},
                          Path(args.compare)))
    return 0


def add_training_verb(verbs: Any, name: str, run: settings.Run, **options: Any) -> argparse.ArgumentParser:
    """A verb configured by TrainConfig (with its profiles), resumable with --resume."""
    parser = settings.add_verb(verbs, name, TrainConfig, run, profiles=PROFILES, **options)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd", description="On-policy distillation: train, diagnose, watch and repair. "
        "The method is explained in docs/method.md.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    add_training_verb(
        verbs, "train", cmd_train, help="run OPD (or a hybrid with GRPO)",
        description="The student samples its own rollouts, the teacher scores every token of "
        "them, the student learns from that signal (docs/method.md#objectives).")
    add_training_verb(
        verbs, "grpo", cmd_train, help="GRPO: the same loop, outcome reward only",
        description="OPD's loop with distill_weight 0 and outcome_weight 1 (unless set).",
        defaults={"outcome_weight": 1.0}, forced={"distill_weight": 0.0})
    settings.add_verb(verbs, "eval", EvalConfig, cmd_eval,
                      help="avg@n accuracy of a model on a prompt set with answers",
                      description="Sample n responses per prompt and verify each one.")
    report = verbs.add_parser("report", help="figures and a markdown report from run folders")
    report.add_argument("runs", nargs="+", help="run folders (each gets report.md + PNGs)")
    report.add_argument("--compare", help="also write one PNG with all runs' curves here")
    report.set_defaults(func=cmd_report)
    diagnose_cli.register(verbs)
    recipes_cli.register(verbs, add_training_verb)
    lab_cli.register(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is happening
    args = build_parser().parse_args(argv)
    if getattr(args, "help_config", False):
        print("Settings (YAML keys, --set key=value, or --flag):\n"
              + settings.describe(args.config_class))
        return 0
    verb = " ".join(v for v in (args.verb, getattr(args, "lab_verb", None)) if v)
    try:
        if hasattr(args, "func"):
            return args.func(args)
        return args.run(settings.config_of(args), args)
    except OPDError as err:
        print(f"opd {verb}: error: {one_line(err, 1000)}", file=sys.stderr)
        return 2
    except OSError as err:  # the disk or the file system, wherever no nearer check named it
        where = f"{err.filename}: " if err.filename else ""
        again = " (with --resume)" if hasattr(args, "resume") else ""
        print(f"opd {verb}: error: {where}{err.strerror or one_line(err)}; free space or fix "
              f"permissions, then run again{again}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"opd {verb}: interrupted; `--resume` continues from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
