"""The step hooks every training verb registers around the loop, in order: the run report
(`opd.run.report`), the final model folder with its card (`opd.run.cards`), then the experiment
trackers of `report_to` (`opd.run.trackers`), which log the report's figures when the run ends.

`run_hooks` checks that the trackers asked for are installed, so call it before the run starts:
a missing one stops the run before any model loads.
"""

from __future__ import annotations

from opd.config.training import TrainConfig
from opd.run.cards import FinalModelHook
from opd.run.report import ReportHook
from opd.run.trackers import tracker_hooks
from opd.runtime import StepHook


def run_hooks(config: TrainConfig) -> list[StepHook]:
    """[report, final model, *trackers] for the run `config`."""
    trackers = tracker_hooks(config)
    return [ReportHook(config.out), FinalModelHook(config), *trackers]
