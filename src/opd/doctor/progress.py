"""How far a diagnosis has come and how long it will take, in token passes: a token generated
(one decode step of one rollout row, finished rows included, since they ride along in the
batch) or a response token scored by one model. The plan is an upper bound known before any
work (every rollout runs to `max_new_tokens`), tightened once the student's rollouts are in;
the estimate comes from the first decode steps' rate."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

CALIBRATION_STEPS = 16
"""Decode steps timed before the estimate is given (a few seconds on a CPU)."""
LONG_SECONDS = 1800
"""An estimate beyond this says which settings shorten the diagnosis."""


@dataclass(frozen=True)
class DiagnosisShape:
    """What a diagnosis will do: rollouts, their length cap, continuation depths, teachers,
    and the template checks (teachers whose own rendering differs from the student's)."""

    rollouts: int
    max_new_tokens: int
    depths: int
    teachers: int
    answers: bool
    template_checks: int
    teacher_pairs: int = 0  # teacher against teacher2: one more scoring pass


def planned_passes(shape: DiagnosisShape, response_tokens: int | None = None,
                   continuation_steps: int | None = None) -> int:
    """Token passes of a whole diagnosis. Before the student's rollouts, an upper bound;
    after them, `response_tokens` (their total length) and `continuation_steps` (the decode
    row-steps of one model's continuations at every depth) make it nearly exact."""
    full = shape.rollouts * shape.max_new_tokens
    responses = full if response_tokens is None else response_tokens
    continuations = shape.depths * full if continuation_steps is None else continuation_steps
    scoring = 2 * responses * (shape.teachers + shape.template_checks + shape.teacher_pairs)
    generation = full  # the student's rollouts
    if shape.answers:
        generation += continuations + shape.teachers * (full + continuations)  # own attempts
    return generation + scoring


@dataclass
class WorkMeter:
    """The progress bar of a diagnosis, and its estimate of the time left (printed once)."""

    total: int
    enabled: bool = True
    bar: Any = field(init=False)
    estimate_seconds: float | None = field(init=False, default=None)
    _start: float | None = field(init=False, default=None)
    _start_n: int = field(init=False, default=0)
    _steps: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.bar = tqdm(total=self.total, desc="opd diagnose", unit="tok", unit_scale=True,
                        disable=not self.enabled, file=sys.stderr)

    def stage(self, text: str) -> None:
        self.bar.set_postfix_str(text)

    def replan(self, remaining: int) -> None:
        """What is left, as now known."""
        self.bar.total = self.bar.n + remaining
        self.bar.refresh()

    def decoded(self, rows: int) -> None:
        """One decode step of `rows` rollouts; the estimate once CALIBRATION_STEPS are timed."""
        now = time.perf_counter()
        if self._start is None:  # the first step carries the prompts' prefill: not timed
            self._start, self._start_n = now, self.bar.n + rows
        self.advance(rows)
        self._steps += 1
        if self._steps == CALIBRATION_STEPS and self.estimate_seconds is None:
            rate = (self.bar.n - self._start_n) / max(now - self._start, 1e-9)
            self.estimate_seconds = (self.bar.total - self.bar.n) / rate + (now - self._start)
            if self.enabled:
                hint = ("; fewer --num-prompts or --samples-per-prompt, a shorter "
                        "--max-new-tokens or fewer --depths shorten it"
                        if self.estimate_seconds > LONG_SECONDS else "")
                self.bar.write(f"opd diagnose: about {_duration(self.estimate_seconds)} "
                               f"({self.bar.total:,} token passes at {rate:,.0f}/s, an upper "
                               f"bound: rollouts that stop early make it shorter{hint})",
                               file=sys.stderr)

    def advance(self, passes: int) -> None:
        self.bar.update(passes)

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
