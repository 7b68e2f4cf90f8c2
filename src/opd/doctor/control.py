"""Does the teacher matter? The same short OPD run with the teacher's signal and with controls
that carry no teacher information (`objective.control`), and the share of the gain that needs
the teacher (docs/diagnose.md#does-the-teacher-matter).

It trains (three short runs, `DiagnoseConfig.control_steps` each), so `opd diagnose` runs it
only with `--control`. The runs live in a temporary folder; only their numbers are kept.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from opd.config.choices import CONTROL_NONE, CONTROLS


def teacher_share(gain_teacher: float, gain_control: float) -> float | None:
    """(gain_teacher − gain_control) / gain_teacher: the share of the teacher's gain that the
    control does not reproduce. None when the teacher brings no gain (nothing to share)."""
    if gain_teacher <= 0:
        return None
    return (gain_teacher - gain_control) / gain_teacher


def summarise(before: float, after: dict[str, float]) -> dict[str, Any]:
    """Gains (accuracy after − before) of each signal and each control's teacher share."""
    gains = {signal: acc - before for signal, acc in after.items()}
    return {
        "accuracy_before": before, "accuracy_after": after, "gain": gains,
        "teacher_share": {signal: teacher_share(gains[CONTROL_NONE], gain)
                          for signal, gain in gains.items() if signal != CONTROL_NONE},
    }


def measure_control(base: Mapping[str, Any], profile: str,
                    accuracy: Callable[[str], float]) -> dict[str, Any]:
    """Train the student with the teacher's signal (control `none`) and with each control,
    each run from the training settings `base` (TrainConfig values: student, teacher,
    prompts, max_steps, …) over the training profile `profile`, and measure `accuracy` (of
    a model folder) of the student before and of each trained student after."""
    from opd.config.training import build_config
    from opd.run.loop import run_training

    after = {}
    with tempfile.TemporaryDirectory(prefix="opd-control-") as folder:
        for signal in CONTROLS:
            train = build_config(base, {"out": str(Path(folder) / signal), "progress": False,
                                        "eval_every": 0, "save_every": base["max_steps"],
                                        "keep_checkpoints": 1, "objective": {"control": signal}},
                                 profile=profile)
            after[signal] = accuracy(run_training(train)["final_checkpoint"])
    before = accuracy(base["student"])
    return {"steps": base["max_steps"], "profile": profile, **summarise(before, after)}
