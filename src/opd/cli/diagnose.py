"""The `opd diagnose` verb: DiagnoseConfig → `opd.api.diagnose` → table, diagnosis.json, report."""

from __future__ import annotations

import argparse
from typing import Any

from opd.config import settings
from opd.doctor.measure import DiagnoseConfig


def cmd_diagnose(config: DiagnoseConfig, args: argparse.Namespace) -> int:
    from opd import api
    from opd.doctor.report import print_ranking, print_table

    if config.teachers:
        diagnoses = api.diagnose_teachers(config=config, out=config.out)
    else:
        diagnoses = {None: api.diagnose(config=config, out=config.out)}
    for name, diagnosis in diagnoses.items():
        if name is not None:
            print(f"teacher {name!r} ({config.teacher_field} = {name}): {diagnosis.verdict}")
        print_table(diagnosis.data)
        print(f"wrote {diagnosis.out / 'diagnosis.json'} and {diagnosis.out / 'report.md'}")
    if config.teachers:
        print_ranking({name: diagnosis.data for name, diagnosis in diagnoses.items()})
    return 0


def register(verbs: Any) -> None:
    settings.add_verb(
        verbs, "diagnose", DiagnoseConfig, cmd_diagnose,
        help="before training: will OPD work for this pair, why, and what to do",
        description="Measure thinking-pattern compatibility, teacher novelty from the student's "
        "states, the template, the horizon and the global signal on the student's own "
        "rollouts; print a verdict (go, pattern-mismatch, no-novelty, horizon-risk) and write "
        "diagnosis.json, report.md and figures to --out.",
    )
