"""The totals of one training step: added up over its micro-batches, reduced across processes
once.

Each micro-batch adds its loss and, per teacher share, its measures' sums and counts by response
position bin and its largest gap to the rollout engine's log-probs. Totals rather than means, so
the step's means do not depend on how its rows were split into micro-batches or processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from opd import metrics as M
from opd.runtime import Processes
from opd.step.measures import means_from_totals, position_totals

Totals = tuple[torch.Tensor, torch.Tensor]
"""Sums and counts [measures, 1 + bins] of `position_totals`."""


@dataclass
class StepTotals:
    """The running totals of one step (this process's share of it)."""

    bin_edges: list[int]
    loss: float = 0.0
    names: list[str] = field(default_factory=list)
    measures: Totals | None = None
    by_teacher: dict[str, Totals] = field(default_factory=dict)
    gap_max: float = 0.0

    def add_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss (after its backward)."""
        self.loss += float(loss.detach())

    def add_measures(self, measures: dict[str, torch.Tensor], positions: torch.Tensor,
                     teacher: str | None) -> None:
        """One share's per-token measures at their response positions; `teacher` names the
        share's teacher when the run has several. An empty share (no process has tokens for
        it) brings no measures and adds nothing."""
        if not measures:
            return
        gap = measures.get(M.ROLLOUT_LOGPROB_GAP)
        if gap is not None and gap.numel():
            self.gap_max = max(self.gap_max, float(gap.max()))
        self.names = list(measures)
        part = position_totals(measures, positions, self.bin_edges)
        self.measures = _added(self.measures, part)
        if teacher is not None:
            self.by_teacher[teacher] = _added(self.by_teacher.get(teacher), part)

    def total_loss(self, procs: Processes) -> float:
        """The step's loss, summed over processes."""
        return float(procs.sum(torch.tensor(self.loss, dtype=torch.float64)))

    def teacher_means(self, procs: Processes,
                      teachers: Sequence[str]) -> dict[str, dict[str, float | None]]:
        """Each teacher's overall means, summed over processes (every process, in the order
        of `teachers`, also for a teacher it had no rows of)."""
        sums, counts = self.measures
        means = {}
        for name in teachers:
            part_sums, part_counts = self.by_teacher.get(name, (sums * 0, counts * 0))
            means[name] = means_from_totals(
                self.names, procs.sum(part_sums).cpu(), procs.sum(part_counts).cpu())[0]
        return means

    def means(self, procs: Processes
              ) -> tuple[dict[str, float | None], dict[str, list[float | None]]]:
        """The overall and per-position-bin means, summed over processes."""
        sums, counts = procs.sum(self.measures[0]), procs.sum(self.measures[1])
        return means_from_totals(self.names, sums.cpu(), counts.cpu())


def _added(total: Totals | None, part: Totals) -> Totals:
    """`part` added to a running total (None: nothing yet)."""
    return part if total is None else (total[0] + part[0], total[1] + part[1])
