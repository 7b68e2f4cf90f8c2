"""The `opd` command: one verb per job, each a thin layer over the function that does it.

Every verb's flags, YAML (`--config`), `--set` and `--help-config` come from its config
dataclass (`opd.config.settings`). Bad input prints one line naming the field and the fix (exit 2),
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from opd import api
from opd.cli import diagnose as diagnose_cli
from opd.cli import lab as lab_cli
from opd.cli import recipes as recipes_cli
from opd.config import settings
from opd.config.training import PROFILES, TrainConfig
from opd.errors import OPDError, one_line
from opd.evaluation.accuracy import EvalConfig
from opd.runtime import is_main_process
from opd.study.run import ReproduceConfig
from opd.teachers.server import ServeConfig
from opd.version import __version__


def print_result(result: dict[str, Any]) -> int:
    """Print a JSON result once, from the main process of a multi-process launch."""
    if is_main_process():
        print(json.dumps(result, indent=2))
    return 0


def cmd_train(config: TrainConfig, args: argparse.Namespace) -> int:
    """`opd train` and `opd grpo`: `opd.api.train` (the loop with the run report, the final
    model folder, the trackers and, when asked, the cold-start handover)."""
    return print_result(api.train(config, resume=args.resume).summary)


def cmd_eval(config: EvalConfig, args: argparse.Namespace) -> int:
    result = api.evaluate(config=config)
    return print_result({"model": config.model, "prompts": config.prompts,
                         "accuracy": result.accuracy, "n": result.n,
                         "n_prompts": result.n_prompts,
                         "mean_response_length": result.mean_response_length,
                         "truncation_rate": result.truncation_rate})


def cmd_serve_teacher(config: ServeConfig, args: argparse.Namespace) -> int:
    api.serve_teacher(config=config)
    return 0


def cmd_reproduce(config: ReproduceConfig, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    summary = api.reproduce(config=config)
    table = Table(title=f"the study's findings ({config.profile}, {config.seeds} seeds)")
    for column in ("#", "finding", "verdict"):
        table.add_column(column)
    for finding in summary["findings"]:
        table.add_row(str(finding["number"]), finding["title"], finding["verdict"])
    Console().print(table)
    print(f"{config.out}/report.md")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    for path in api.report(*args.runs, compare=args.compare):
        print(path)
    return 0


def add_training_verb(verbs: Any, name: str, run: settings.Run, **options: Any) -> argparse.ArgumentParser:
    """A verb configured by TrainConfig (with its profiles), resumable with --resume."""
    parser = settings.add_verb(verbs, name, TrainConfig, run, profiles=PROFILES, **options)
    parser.add_argument(
        "--resume", nargs="?", const=True, default=False, choices=["auto"],
        help="continue the run in --out from its last complete checkpoint; `--resume auto`: "
        "continue it when it has one, else start a new run (one command for a first launch "
        "and every relaunch)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd", description="On-policy distillation: train, diagnose, watch and repair.",
        epilog="The method: the student samples its own answers, the teacher scores every token "
        "of them from the student's own prefixes, and the student learns to lower its per-token "
        "reverse KL from the teacher (by default over the student's top-k tokens). `opd "
        "diagnose` says before training whether a pair will learn. Each verb's flags: `opd VERB "
        "--help`; every setting with its default and meaning: `opd VERB --help-config` (e.g. "
        "`opd train --help-config`).",
    )
    parser.add_argument("--version", action="version", version=f"opd {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    add_training_verb(
        verbs, "train", cmd_train, help="run OPD (or a hybrid with GRPO)",
        description="The student samples its own rollouts, the teacher scores every token of "
        "them, the student learns from that signal (the objectives: --objective.name).")
    add_training_verb(
        verbs, "grpo", cmd_train, help="GRPO: the same loop, outcome reward only",
        description="OPD's loop with distill_weight 0 and outcome_weight 1 (unless set).",
        defaults={"outcome_weight": 1.0}, forced={"distill_weight": 0.0})
    settings.add_verb(verbs, "eval", EvalConfig, cmd_eval,
                      help="avg@n accuracy of a model on a prompt set with answers",
                      description="Sample n responses per prompt and verify each one.")
    settings.add_verb(verbs, "serve-teacher", ServeConfig, cmd_serve_teacher,
                      help="serve a teacher over HTTP for training runs elsewhere",
                      description="Score and sample with a teacher model for the verbs that "
                      "pass --teacher http://HOST:PORT (train, grpo, diagnose, cold-start, "
                      "select-prompts); needs the serve extra (--backend vllm: the vllm extra).")
    settings.add_verb(verbs, "reproduce", ReproduceConfig, cmd_reproduce,
                      help="re-run the study's findings on the model organisms",
                      description="Builds the zoo it needs, runs every finding's experiments for "
                      "each seed (finished ones are kept: run again to resume), judges each "
                      "finding by its rule and writes OUT/report.md (each finding's claim, rule and "
                      "verdict), results.json and figures.")
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
