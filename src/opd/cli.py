"""The `opd` command. Every verb has --help; errors from bad input print one line, no traceback."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

from opd.errors import OPDError

COMMON_FLAGS = (
    ("--student", str, "student model folder (or hub id)"),
    ("--teacher", str, "teacher model folder (or hub id)"),
    ("--prompts", str, "prompt file (.jsonl or .parquet)"),
    ("--out", str, "run folder"),
    ("--max-steps", int, "optimizer steps"),
    ("--prompts-per-step", int, "prompts per step (global)"),
    ("--rollouts-per-prompt", int, "samples per prompt"),
    ("--max-new-tokens", int, "response length cap"),
    ("--seed", int, "random seed"),
)


def training_parent() -> argparse.ArgumentParser:
    """Flags shared by every training verb."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("run settings (override --config; any field via --set)")
    group.add_argument("--config", help="YAML file of config fields")
    group.add_argument("--profile", default=None, help="defaults profile: study or cpu-small")
    for flag, kind, text in COMMON_FLAGS:
        group.add_argument(flag, type=kind, help=text)
    group.add_argument("--resume", action="store_true", help="continue the run in --out")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="set any config field (repeatable); see --help-config")
    group.add_argument("--help-config", action="store_true", help="list every config field")
    return parent


def config_from_args(args: argparse.Namespace, forced: dict[str, Any] | None = None):
    """TrainConfig from defaults < profile < --config < flags < --set < forced values."""
    from opd.config import build_config, load_yaml, parse_set

    file_layer = load_yaml(args.config) if args.config else {}
    profile = args.profile or file_layer.pop("profile", "study")
    flags = {
        flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
        for flag, _, _ in COMMON_FLAGS
    }
    return build_config(file_layer, flags, parse_set(args.set), forced or {}, profile=profile)


def _print_config_help() -> None:
    from opd.config import describe_fields

    print("Config fields (YAML keys, or --set key=value):\n" + describe_fields())


def print_from_main(result: dict[str, Any]) -> int:
    """Print a JSON result once, from the main process of a multi-process launch."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps(result, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from opd.recipes.cold_start import train_with_repair

    return print_from_main(train_with_repair(config_from_args(args), resume=args.resume))


def cmd_grpo(args: argparse.Namespace) -> int:
    from opd.config import load_yaml, parse_set
    from opd.train import run_training

    given = {**(load_yaml(args.config) if args.config else {}), **parse_set(args.set)}
    forced = {"distill_weight": 0.0, "outcome_weight": given.get("outcome_weight", 1.0)}
    return print_from_main(run_training(config_from_args(args, forced), resume=args.resume))


def cmd_eval(args: argparse.Namespace) -> int:
    from opd.data.prompts import load_prompts
    from opd.evaluate import evaluate
    from opd.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model, "model")
    model = load_model(args.model, "model", trainable=False)
    result = evaluate(
        model, tokenizer, load_prompts(args.prompts), n=args.n, temperature=args.temperature,
        top_p=args.top_p, max_new_tokens=args.max_new_tokens, verifier=args.verifier,
        template=args.template, seed=args.seed,
    )
    print(json.dumps({"model": args.model, "prompts": args.prompts, "accuracy": result.accuracy,
                      "n": result.n, "n_prompts": result.n_prompts,
                      "mean_response_length": result.mean_response_length,
                      "truncation_rate": result.truncation_rate}, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from opd.checkpoints import read_jsonl
    from opd.report import plot_curves, write_run_report

    for run in args.runs:
        if not (Path(run) / "metrics.jsonl").exists():
            raise OPDError(f"report: {run!r} is not a run folder (no metrics.jsonl in it)")
    for run in args.runs:
        print(write_run_report(run))
    if args.compare:
        runs = {Path(r).name: read_jsonl(Path(r) / "metrics.jsonl") for r in args.runs}
        print(plot_curves(runs, Path(args.compare)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd", description="On-policy distillation: train, diagnose, watch and repair."
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    parent = training_parent()

    train = verbs.add_parser("train", parents=[parent], help="run OPD (or a hybrid with GRPO)",
                             description="Student rollouts scored by the teacher; see SPEC §2.")
    train.set_defaults(func=cmd_train)
    grpo = verbs.add_parser("grpo", parents=[parent], help="GRPO: the same loop, outcome reward only",
                            description="OPD's loop with distill_weight 0 and outcome_weight 1.")
    grpo.set_defaults(func=cmd_grpo)

    ev = verbs.add_parser("eval", help="avg@n accuracy of a model on a prompt set with answers")
    ev.add_argument("--model", required=True, help="model folder")
    ev.add_argument("--prompts", required=True, help="prompt file with an 'answer' per row")
    ev.add_argument("--n", type=int, default=1, help="samples per prompt (avg@n)")
    ev.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--verifier", default="exact", help="exact or math")
    ev.add_argument("--template", default=None, help="format string with {prompt}")
    ev.add_argument("--seed", type=int, default=0)
    ev.set_defaults(func=cmd_eval)

    report = verbs.add_parser("report", help="figures and a markdown report from run folders")
    report.add_argument("runs", nargs="+", help="run folders (each gets report.md + PNGs)")
    report.add_argument("--compare", help="also write one PNG with all runs' curves here")
    report.set_defaults(func=cmd_report)

    for target in EXTRA_VERBS:
        module, function = target.split(":")
        register: Callable[[Any, argparse.ArgumentParser], None] = getattr(
            importlib.import_module(module), function
        )
        register(verbs, parent)
    return parser


# Verbs that live beside the code they run: "module:function", each function called with the
# subparsers object and the shared training-flags parent.
EXTRA_VERBS: tuple[str, ...] = ("opd.diagnose.cli:register", "opd.recipes.cli:register",
                               "opd.recipes.select_cli:register", "opd.lab.cli:register")


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is happening
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "help_config", False):
        _print_config_help()
        return 0
    try:
        return args.func(args)
    except OPDError as err:
        print(f"opd {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"opd {args.verb}: interrupted; `--resume` continues from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
