"""A forecast of the gap recovery of the planned run, from one diagnosis measurement, fitted on
outcomes of runs opd made (docs/diagnose.md#forecast).

The model is a straight line, outcome ≈ intercept + slope · measurement, fitted by least
squares on rows (pair, seed, measurements, outcome); its 80% interval adds the 10% and 90%
quantiles of the fitted rows' residuals (widened to hold the expected value). Which
measurement: the candidate with the smallest leave-one-pair-out error. The same calibration
decides whether the forecast is shown at all: a line that does not beat predicting the mean of
the other pairs' outcomes (the same interval rule around it) is not a forecast, and `opd
diagnose` says so instead.

Pure functions, and the fitted file `forecast.json` beside this module, which
`bench/forecast.py` writes from the zoo's runs (rows, fit and calibration).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FORECAST_FILE = Path(__file__).with_name("forecast.json")
COVERAGE = 0.8
"""The interval's nominal share of outcomes."""
MEASUREMENTS = ("overlap_share", "novelty")
"""Candidate measurements, as the diagnosis's checks name them: `pattern` (the overlap share
at pattern_k) and `novelty` (teacher − student accuracy from the student's states, unsolved
prompts)."""
CHECK_OF = {"overlap_share": "pattern", "novelty": "novelty"}
"""The diagnosis check whose value each measurement is."""

Row = Mapping[str, Any]
"""One run: `pair`, `seed`, `measurements` (name → value) and `outcome` (gap recovery)."""


@dataclass(frozen=True)
class Line:
    """outcome ≈ intercept + slope · x, with the residual quantiles of the 80% interval."""

    intercept: float
    slope: float
    low_offset: float
    high_offset: float

    def predict(self, x: float) -> tuple[float, float, float]:
        """(expected, low, high) at x."""
        expected = self.intercept + self.slope * x
        return expected, expected + self.low_offset, expected + self.high_offset


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile of `values`, linear between order statistics (position q·(n − 1))."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def _with_interval(intercept: float, slope: float, xs: Sequence[float],
                   ys: Sequence[float]) -> Line:
    residuals = [y - (intercept + slope * x) for x, y in zip(xs, ys, strict=True)]
    tail = (1 - COVERAGE) / 2
    # Skewed residuals can put both quantiles on one side of 0; the interval keeps the
    # expected value inside it (a little wider, never narrower).
    return Line(intercept, slope, min(quantile(residuals, tail), 0.0),
                max(quantile(residuals, 1 - tail), 0.0))


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> Line:
    """Least-squares line of ys on xs (flat at the mean when xs do not vary)."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = 0.0 if spread == 0 else sum(
        (x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    return _with_interval(mean_y - slope * mean_x, slope, xs, ys)


def fit_mean(xs: Sequence[float], ys: Sequence[float]) -> Line:
    """The baseline: predict the mean outcome, whatever the measurement."""
    return _with_interval(statistics.fmean(ys), 0.0, xs, ys)


Fitter = Callable[[Sequence[float], Sequence[float]], Line]


def leave_one_pair_out(rows: Sequence[Row], measurement: str,
                       fitter: Fitter) -> list[dict[str, Any]]:
    """Each row forecast by a model fitted on the rows of the other pairs only."""
    out = []
    for pair in sorted({row["pair"] for row in rows}):
        train = [row for row in rows if row["pair"] != pair]
        line = fitter([row["measurements"][measurement] for row in train],
                      [row["outcome"] for row in train])
        for row in rows:
            if row["pair"] == pair:
                expected, low, high = line.predict(row["measurements"][measurement])
                out.append({"pair": pair, "seed": row["seed"], "outcome": row["outcome"],
                            "measurement": row["measurements"][measurement],
                            "forecast": expected, "low": low, "high": high})
    return out


def calibration(held_out: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean absolute error of the held-out forecasts and the share of outcomes inside their
    interval."""
    return {
        "mae": statistics.fmean(abs(r["forecast"] - r["outcome"]) for r in held_out),
        "coverage": statistics.fmean(r["low"] <= r["outcome"] <= r["high"] for r in held_out),
    }


def fit_forecast(rows: Sequence[Row], conditions: Mapping[str, Any]) -> dict[str, Any]:
    """The fit on every row with the measurement (of those every row has) of smallest
    leave-one-pair-out error, its
    calibration beside the mean baseline's, and whether it beats the baseline (the contents
    of forecast.json, with the rows and the `conditions` of the runs they came from)."""
    if len({row["pair"] for row in rows}) < 3:
        raise ValueError("fit_forecast needs rows of at least 3 pairs (leave one out, fit a "
                         "line on the others)")
    candidates = {}
    for name in MEASUREMENTS:
        if any(row["measurements"].get(name) is None for row in rows):
            continue  # not measured on every row (novelty needs unsolved prompts)
        held_out = leave_one_pair_out(rows, name, fit_line)
        candidates[name] = {"held_out": held_out, **calibration(held_out)}
    chosen = min(candidates, key=lambda name: candidates[name]["mae"])
    baseline = leave_one_pair_out(rows, chosen, fit_mean)
    xs = [row["measurements"][chosen] for row in rows]
    line = fit_line(xs, [row["outcome"] for row in rows])
    return {
        "measurement": chosen, "line": asdict(line), "coverage": COVERAGE,
        "conditions": dict(conditions), "rows": [dict(row) for row in rows],
        "calibration": {"candidates": candidates,
                        "mean_baseline": {"held_out": baseline, **calibration(baseline)}},
        "beats_mean": candidates[chosen]["mae"] < calibration(baseline)["mae"],
        "measurement_range": [min(xs), max(xs)],
    }


def load_fit(path: Path = FORECAST_FILE) -> dict[str, Any] | None:
    """forecast.json, or None when it was never refreshed."""
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def forecast_for(checks: Mapping[str, Mapping[str, Any]], fit: Mapping[str, Any] | None,
                 plan: Mapping[str, Any]) -> dict[str, Any]:
    """The forecast of a diagnosis (its `checks`) for the planned run `plan` (steps,
    objective), or why there is none: no fit, a fit that does not beat the mean, or no value
    of its measurement in this diagnosis."""
    if fit is None:
        return {"shown": False, "reason": "no fitted forecast (forecast.json): bench/forecast.py "
                "writes one once runs of at least 3 pairs with a gap to recover can be "
                "calibrated (docs/diagnose.md#forecast)"}
    held = fit["calibration"]["candidates"][fit["measurement"]]
    baseline = fit["calibration"]["mean_baseline"]
    summary = {"measurement": fit["measurement"], "fitted_on": fit["conditions"],
               "pairs": sorted({row["pair"] for row in fit["rows"]}), "rows": len(fit["rows"]),
               "held_out_mae": held["mae"], "held_out_coverage": held["coverage"],
               "mean_baseline_mae": baseline["mae"]}
    if not fit["beats_mean"]:
        return {"shown": False, **summary,
                "reason": f"the fitted line does not beat predicting the mean in leave-one-pair-"
                f"out (error {held['mae']:.3f} vs {baseline['mae']:.3f}): not a forecast"}
    value = checks.get(CHECK_OF[fit["measurement"]], {}).get("value")
    if value is None:
        return {"shown": False, **summary,
                "reason": f"this diagnosis has no {fit['measurement']} (it needs answers)"}
    expected, low, high = Line(**fit["line"]).predict(value)
    low_x, high_x = fit["measurement_range"]
    notes = []
    if not low_x <= value <= high_x:
        notes.append(f"{fit['measurement']} {value:.3f} lies outside the fitted range "
                     f"[{low_x:.3f}, {high_x:.3f}]: an extrapolation")
    fitted_steps = fit["conditions"].get("steps")
    if plan.get("steps") != fitted_steps:
        notes.append(f"fitted on {fitted_steps}-step runs; the planned {plan.get('steps')} "
                     "steps may recover more or less")
    return {"shown": True, **summary, "value": value, "expected": expected, "low": low,
            "high": high, "coverage": fit["coverage"], "plan": dict(plan), "notes": notes}
