"""`opd lab build` (the zoo of model organisms) and `opd demo` (the embedded default)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opd.config import settings
from opd.config.settings import Config, setting
from opd.errors import OPDError
from opd.io import fmt
from opd.lab.demo import DEMO_PROFILES, print_demo, run_demo
from opd.lab.zoo import PROFILES

CACHE = ".opd-cache/zoo"


@dataclass(frozen=True)
class BuildConfig(Config):
    """Settings of `opd lab build`."""

    profile: str = setting("full", "Which zoo: full (2–3 digits), quick (2 digits, for tests) "
                           "or choice (the quick zoo in a world with genuine choice of words "
                           "and order).",
                           choices=tuple(PROFILES))
    root: str = setting(CACHE, "Cache folder of the zoo (one sub-folder per profile).")


@dataclass(frozen=True)
class DemoConfig(Config):
    """Settings of `opd demo`."""

    quick: bool = setting(False, f"Small profile ({DEMO_PROFILES['quick'].steps} steps, quick "
                          "zoo).")
    choice: bool = setting(False, f"The quick profile in the world with genuine choice "
                           f"({DEMO_PROFILES['choice'].steps} steps, choice zoo), where the "
                           "overlap the study tracks can rise.")
    out: str | None = setting(None, "Run folder (default runs/demo, runs/demo-quick or "
                              "runs/demo-choice).")
    cache: str = setting(CACHE, "Zoo cache folder.")
    seed: int = setting(0, "Seed of the OPD run.")


def cmd_lab_build(config: BuildConfig, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from opd import api

    built = api.build_zoo(config.profile, config.root, progress=True)  # checks the root first
    root, zoo = built.root, built.data
    table = Table(title=f"zoo ({config.profile}) in {root}")
    groups = list(zoo["eval_groups"])
    for column in ("model", "role", "dialect", "template", "params", *groups, "build s"):
        table.add_column(column, no_wrap=True)
    for name, model in zoo["models"].items():
        table.add_row(name, model["role"], model["dialect"], str(model["template"]),
                      f"{model['parameters'] / 1e6:.2f}M",
                      *(fmt(model["accuracy"][g]) for g in groups),
                      str(zoo["build_seconds"].get(name)))
    Console().print(table)
    print(root / "zoo.json")
    return 0


def cmd_demo(config: DemoConfig, args: argparse.Namespace) -> int:
    if config.quick and config.choice:
        raise OPDError("demo: choose one of --quick and --choice (--choice is already quick)")
    profile = "choice" if config.choice else "quick" if config.quick else "full"
    out = Path(config.out or f"runs/demo{'' if profile == 'full' else '-' + profile}")
    zoo_root = Path(config.cache) / DEMO_PROFILES[profile].zoo
    print_demo(run_demo(out, zoo_root, profile=profile, seed=config.seed), out)
    return 0


def register(verbs: Any) -> None:
    lab = verbs.add_parser("lab", help="the model organisms: a synthetic world trained here")
    lab_verbs = lab.add_subparsers(dest="lab_verb", metavar="LAB_VERB")
    lab_verbs.required = True
    settings.add_verb(lab_verbs, "build", BuildConfig, cmd_lab_build,
                      help="build (or load) the zoo and print its table",
                      description="Trains the student and the planted teachers from scratch on "
                      "the CPU; cached, so a second run only loads.")
    settings.add_verb(verbs, "demo", DemoConfig, cmd_demo,
                      help="the embedded default: OPD on the model organisms",
                      description="Builds what it needs, evaluates the student, runs OPD from "
                      "teacher-aligned, evaluates again and prints before/after.")
