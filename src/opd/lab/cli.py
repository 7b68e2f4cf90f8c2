"""`opd lab build` (the zoo of model organisms) and `opd demo` (the embedded default)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from opd.lab.demo import DEMO_PROFILES, print_demo, run_demo
from opd.lab.zoo import PROFILES, build_zoo


def cmd_lab_build(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    root = Path(args.root) / args.profile
    zoo = build_zoo(root, args.profile, progress=True)
    table = Table(title=f"zoo ({args.profile}) in {root}")
    groups = list(zoo["eval_groups"])
    for column in ("model", "role", "dialect", "template", "params", *groups, "build s"):
        table.add_column(column, no_wrap=True)
    for name, model in zoo["models"].items():
        table.add_row(name, model["role"], model["dialect"], str(model["template"]),
                      f"{model['parameters'] / 1e6:.2f}M",
                      *(f"{model['accuracy'][g]:.3f}" for g in groups),
                      str(zoo["build_seconds"].get(name)))
    Console().print(table)
    print(root / "zoo.json")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    profile = "quick" if args.quick else "full"
    out = Path(args.out or f"runs/demo{'-quick' if args.quick else ''}")
    zoo_root = Path(args.cache) / DEMO_PROFILES[profile].zoo
    print_demo(run_demo(out, zoo_root, profile=profile, seed=args.seed), out)
    return 0


def register(verbs: Any, parent: argparse.ArgumentParser) -> None:
    lab = verbs.add_parser("lab", help="the model organisms: a synthetic world trained here")
    lab_verbs = lab.add_subparsers(dest="lab_verb", metavar="LAB_VERB")
    lab_verbs.required = True
    build = lab_verbs.add_parser("build", help="build (or load) the zoo and print its table",
                                 description="Trains the student and the planted teachers from "
                                 "scratch on the CPU; cached, so a second run only loads.")
    build.add_argument("--profile", choices=sorted(PROFILES), default="full")
    build.add_argument("--root", default=".opd-cache/zoo", help="cache folder")
    build.set_defaults(func=cmd_lab_build)

    demo = verbs.add_parser("demo", help="the embedded default: OPD on the model organisms",
                            description="Builds what it needs, evaluates the student, runs OPD "
                            "from teacher-aligned, evaluates again and prints before/after.")
    demo.add_argument("--quick", action="store_true",
                      help=f"small profile ({DEMO_PROFILES['quick'].steps} steps, quick zoo)")
    demo.add_argument("--out", default=None, help="run folder (default runs/demo)")
    demo.add_argument("--cache", default=".opd-cache/zoo", help="zoo cache folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
