"""The `opd diagnose` verb: DiagnoseConfig → measure → table, diagnosis.json, report."""

from __future__ import annotations

import argparse
from typing import Any

from opd import settings
from opd.diagnose.measure import DiagnoseConfig


def cmd_diagnose(config: DiagnoseConfig, args: argparse.Namespace) -> int:
    from opd.diagnose.measure import run_diagnosis
    from opd.diagnose.report import print_table, write_outputs

    diagnosis = run_diagnosis(config)
    out = write_outputs(diagnosis, config.out)
    print_table(diagnosis)
    print(f"wrote {out / 'diagnosis.json'} and {out / 'report.md'}")
    return 0


def register(verbs: Any) -> None:
    settings.add_verb(
        verbs, "diagnose", DiagnoseConfig, cmd_diagnose,
        help="before training: will OPD work for this pair, why, and what to do",
        description="Measure thinking-pattern compatibility, teacher novelty from the student's "
        "states, the template, the horizon and the global signal on the student's own "
        "rollouts; print a verdict (go, pattern-mismatch, no-novelty, horizon-risk) and write "
        "diagnosis.json, report.md and figures to --out (docs/diagnose.md).",
    )
