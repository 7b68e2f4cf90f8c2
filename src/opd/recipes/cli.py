"""`opd cold-start` (and the monitor's cold-start action in `opd train`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from opd.recipes.cold_start import ColdStartConfig, run_cold_start


def cmd_cold_start(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from opd.cli import config_from_args

    given = {name: getattr(args, f"cs_{name}") for name in CLI_FIELDS}
    cold = ColdStartConfig(**{k: v for k, v in given.items() if v is not None})
    report = run_cold_start(config_from_args(args), cold, resume=args.resume)
    if PartialState().is_main_process:
        print(json.dumps(report, indent=2))
    return 0


CLI_FIELDS = ("prompts", "samples_per_prompt", "max_attempts", "temperature", "top_p", "keep",
              "sft_steps", "sft_lr", "sft_batch_size")


def register(verbs, parent: argparse.ArgumentParser) -> None:
    cold = verbs.add_parser(
        "cold-start", parents=[parent], help="teacher data → SFT → OPD (SPEC §6.1)",
        description="Off-policy cold start: the teacher answers the prompts (verified-correct "
        "answers kept), the student is fine-tuned on them, then OPD runs from that checkpoint. "
        "Each stage is kept in --out and skipped on --resume once complete.",
    )
    group = cold.add_argument_group("cold start")
    docs = {f.name: f for f in fields(ColdStartConfig)}
    for name, flag, kind in (
        ("prompts", "--cold-start-prompts", str), ("samples_per_prompt", None, int),
        ("max_attempts", None, int), ("temperature", "--sampling-temperature", float),
        ("top_p", "--sampling-top-p", float), ("keep", None, str), ("sft_steps", None, int),
        ("sft_lr", None, float), ("sft_batch_size", None, int),
    ):
        group.add_argument(flag or "--" + name.replace("_", "-"), dest=f"cs_{name}", type=kind,
                           default=None, help=f"default {docs[name].default}")
    cold.set_defaults(func=cmd_cold_start)
