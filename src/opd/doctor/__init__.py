"""`opd diagnose`: before training, say whether OPD will work for a teacher–student pair.

`measure` runs the pair on the student's own rollouts, `rules` turns the numbers into a verdict
(go, pattern-mismatch, no-novelty, horizon-risk) with the thresholds it used, `report` writes
diagnosis.json, report.md and figures; the verb is `opd.cli.diagnose`.
"""

from opd.doctor.measure import DiagnoseConfig, run_diagnosis
from opd.doctor.report import write_outputs
from opd.doctor.rules import VERDICTS, Thresholds, decide

__all__ = ["VERDICTS", "DiagnoseConfig", "Thresholds", "decide", "run_diagnosis", "write_outputs"]
