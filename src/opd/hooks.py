"""The step hooks every training verb registers around the loop, in order: the run report
(`opd.report`), the final model folder with its card (`opd.cards`), then the experiment
trackers of `report_to` (`opd.trackers`), which log the report's figures when the run ends.

`run_hooks` checks that the trackers asked for are installed, so call it before the run starts:
a missing one stops the run before any model loads.
"""

from __future__ import annotations

from opd.cards import FinalModelHook
from opd.config import TrainConfig
from opd.report import ReportHook
from opd.runtime import StepHook
from opd.trackers import tracker_hooks


def run_hooks(config: TrainConfig) -> list[StepHook]:
    """[report, final model, *trackers] for the run `config`."""
    trackers = tracker_hooks(config)
    return [ReportHook(config.out), FinalModelHook(config), *trackers]
