"""A live monitor of the study's failure signatures for `opd train` (docs/method.md#measures).

`check_signatures` is a pure function of the metrics so far; `Monitor` keeps the history,
returns each alert once (the loop records it under `alerts`), names the likely cause and the
recipe, and says whether the run should stop (`on_failure` stop or cold-start).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from opd import metrics as M
from opd.config.choices import ON_FAILURE
from opd.errors import OPDError


@dataclass(frozen=True)
class MonitorThresholds:
    """When a signature counts as failing. Window statistics are means over `window` steps."""

    window: int = 8
    """Steps per window; nothing is judged before two windows have passed."""
    low_overlap: float = 0.5
    """Overlap ratio below this, and not rising, means the student's states are foreign to
    the teacher (a same-pattern pair sits near 0.75–0.8 at k=4–16, a foreign one near 0.1–0.3)."""
    min_overlap_rise: float = 0.05
    """Rise of the windowed overlap ratio from the first window that counts as recovering."""
    truncation_jump: float = 0.3
    """Truncation-rate rise over the first window that counts as the format breaking."""
    tail_entropy_ratio: float = 1.5
    """Tail-of-response student entropy over its first-window level that counts as a spike
    (when the front of the response does not rise as much)."""
    rollout_logprob_gap: float = 0.1
    """Mean absolute gap (nats) between the rollout engine's and the trainer's log-probs of the
    sampled tokens, over the last window, above which the engine no longer samples the policy
    being trained (measured on a tiny model: ~1e-7 in float32, ~1e-3 in bf16; docs/results.md)."""


@dataclass(frozen=True)
class Alert:
    rule: str
    step: int
    evidence: dict[str, float]
    cause: str
    recipe: str
    stops: bool = True
    """Whether the alert stops the run under on_failure stop / cold-start (a warning does not)."""


def _window_mean(records: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), int | float)]
    return sum(values) / len(values) if values else None


def _bin_means(records: Sequence[dict[str, Any]], bins: Sequence[int]) -> list[float | None]:
    """Window mean of the student entropy in each of the given position bins."""
    means = []
    for b in bins:
        values = [r[M.BY_POSITION][M.STUDENT_ENTROPY][b] for r in records
                  if r.get(M.BY_POSITION, {}).get(M.STUDENT_ENTROPY, [None] * (b + 1))[b] is not None]
        means.append(sum(values) / len(values) if values else None)
    return means


def _tail_bin(records: Sequence[dict[str, Any]]) -> int | None:
    """The last position bin that every record of the window reached (a fixed bin, so that a
    rare long response does not make the 'tail' jump between bins)."""
    reached = [
        max((i for i, v in enumerate(r.get(M.BY_POSITION, {}).get(M.STUDENT_ENTROPY, []))
             if v is not None), default=-1)
        for r in records
    ]
    last = min(reached, default=-1)
    return last if last >= 1 else None


def check_signatures(history: Sequence[dict[str, Any]], t: MonitorThresholds) -> list[Alert]:
    """Every failing signature visible in the metrics history (oldest first)."""
    alerts = _engine_mismatch(history, t)
    if len(history) < 2 * t.window:
        return alerts
    first, recent = history[: t.window], history[-t.window :]
    step = history[-1][M.STEP]
    overlap_now, overlap_then = _window_mean(recent, M.OVERLAP_RATIO), _window_mean(first, M.OVERLAP_RATIO)
    if overlap_now is not None and overlap_then is not None and overlap_now < t.low_overlap \
            and overlap_now - overlap_then < t.min_overlap_rise:
        alerts.append(Alert(
            "pattern-mismatch", step,
            {M.OVERLAP_RATIO: overlap_now, f"{M.OVERLAP_RATIO}_first_window": overlap_then,
             M.OVERLAP_TOKEN_ADVANTAGE: _window_mean(recent, M.OVERLAP_TOKEN_ADVANTAGE) or 0.0},
            "the teacher's top tokens rarely overlap the student's on the student's own states "
            "and the overlap is not growing: their thinking patterns differ "
            "(docs/method.md#when-opd-works)",
            "off-policy cold start on teacher responses (`opd cold-start`), and/or prompts in the "
            "teacher's template (`opd select-prompts`)",
        ))
    trunc_now, trunc_then = _window_mean(recent, M.TRUNCATION_RATE), _window_mean(first, M.TRUNCATION_RATE)
    if trunc_now is not None and trunc_then is not None and trunc_now - trunc_then > t.truncation_jump:
        alerts.append(Alert(
            "format-collapse", step,
            {M.TRUNCATION_RATE: trunc_now, f"{M.TRUNCATION_RATE}_first_window": trunc_then},
            "responses increasingly run to the length cap: the student's format is breaking",
            "stop and restart from an earlier checkpoint with a lower lr, an off-policy cold "
            "start, or an outcome reward mixed in (outcome_weight)",
        ))
    tail = _tail_bin(first)
    front_then, tail_then = _bin_means(first, [0, tail]) if tail else (None, None)
    front_now, tail_now = _bin_means(recent, [0, tail]) if tail else (None, None)
    if None not in (tail_now, front_now, tail_then, front_then) and tail_then > 0 and front_then > 0:
        tail_ratio, front_ratio = tail_now / tail_then, front_now / front_then
        if tail_ratio > t.tail_entropy_ratio and tail_ratio > front_ratio:
            alerts.append(Alert(
                "tail-entropy", step,
                {"tail_entropy_ratio": tail_ratio, "front_entropy_ratio": front_ratio},
                "student entropy is rising at the end of responses first: dense rewards are "
                "least reliable deep into long responses (docs/method.md#long-horizons)",
                "cap max_new_tokens near the diagnosed horizon (`opd diagnose`) or mix in an "
                "outcome reward",
            ))
    return alerts


def _engine_mismatch(history: Sequence[dict[str, Any]], t: MonitorThresholds) -> list[Alert]:
    """A warning (it does not stop the run) when the rollout engine's log-probs drift from the
    trainer's, judged on the last window (or the steps so far)."""
    gap = _window_mean(history[-t.window :], M.ROLLOUT_LOGPROB_GAP)
    if gap is None or gap <= t.rollout_logprob_gap:
        return []
    return [Alert(
        "rollout-mismatch", history[-1][M.STEP],
        {M.ROLLOUT_LOGPROB_GAP: gap,
         M.ROLLOUT_LOGPROB_GAP_MAX: _window_mean(history[-t.window :], M.ROLLOUT_LOGPROB_GAP_MAX)
         or 0.0},
        "the rollout engine's log-probs of the sampled tokens differ from the trainer's: the "
        "rollouts no longer come from the policy being trained (bf16 or kernel drift, a prompt "
        "rendered differently, weights not synced)",
        "run the engine in the trainer's dtype (dtype: float32), check that engine and trainer "
        "see the same tokens, and/or set tis_cap (e.g. 2) to reweight the loss",
        stops=False,
    )]


class Monitor:
    """Watches the run's records; each failing signature is reported once, when it appears."""

    def __init__(self, on_failure: str = "warn", thresholds: MonitorThresholds | None = None,
                 echo: Callable[[str], None] = print) -> None:
        if on_failure not in ON_FAILURE:
            raise OPDError(f"on_failure: unknown value {on_failure!r}; choose one of {list(ON_FAILURE)}")
        self.on_failure, self.thresholds, self.echo = on_failure, thresholds or MonitorThresholds(), echo
        self.history: list[dict[str, Any]] = []
        self.fired: dict[str, Alert] = {}

    @property
    def stops(self) -> bool:
        """Whether an alert should stop the run (on_failure stop or cold-start)."""
        return self.on_failure != "warn"

    def restore(self, records: Sequence[dict[str, Any]]) -> None:
        """Take up a resumed run's history (its metrics so far) without echoing its alerts
        again, so that the resumed run fires exactly the alerts the uninterrupted one would."""
        self.history = list(records)
        for record in records:
            for alert in record.get(M.ALERTS) or ():
                self.fired.setdefault(alert["rule"], Alert(**alert))

    def observe(self, record: dict[str, Any]) -> list[Alert]:
        """Add one step's record to the history; the alerts that fire for the first time."""
        self.history.append(record)
        new = [a for a in check_signatures(self.history, self.thresholds) if a.rule not in self.fired]
        for alert in new:
            self.fired[alert.rule] = alert
            self.echo(f"[opd monitor] step {alert.step}: {alert.rule}: {alert.cause}. "
                      f"Recipe: {alert.recipe}.")
        return new
