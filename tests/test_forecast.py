"""The forecast of `opd diagnose`: the line, its interval and the leave-one-pair-out
calibration against brute force, and how a fit becomes a forecast or says why not."""

from __future__ import annotations

import itertools
import json
import statistics

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.doctor.forecast import (
    Line,
    calibration,
    fit_forecast,
    fit_line,
    fit_mean,
    forecast_for,
    leave_one_pair_out,
    quantile,
)
from opd.doctor.report import ranking_rows

values = st.floats(-5, 5, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(values, values), min_size=2, max_size=12))
def test_the_line_minimises_the_squared_error(points):
    # Brute force: no nudge of intercept or slope lowers the sum of squared errors.
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    line = fit_line(xs, ys)

    def sse(a: float, b: float) -> float:
        return sum((y - a - b * x) ** 2 for x, y in points)

    best = sse(line.intercept, line.slope)
    for da, db in itertools.product((-1e-3, 0, 1e-3), repeat=2):
        assert best <= sse(line.intercept + da, line.slope + db) + 1e-9
    if len(set(xs)) == 1:
        assert line.slope == 0 and line.intercept == pytest.approx(statistics.fmean(ys))


@settings(max_examples=60, deadline=None)
@given(st.lists(values, min_size=1, max_size=15), st.floats(0, 1))
def test_quantile_interpolates_between_order_statistics(xs, q):
    ordered = sorted(xs)
    found = quantile(xs, q)
    # Brute force: at least a share q of the values lie at or below it, and it lies between
    # the two order statistics around position q·(n − 1).
    position = q * (len(xs) - 1)
    assert ordered[int(position)] - 1e-9 <= found <= ordered[min(int(position) + 1, len(xs) - 1)] + 1e-9
    assert quantile(xs, 0) == ordered[0] and quantile(xs, 1) == ordered[-1]
    assert found == pytest.approx(float(numpy.quantile(xs, q)), abs=1e-9)  # its "linear" rule


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(values, values), min_size=3, max_size=12))
def test_the_interval_spans_the_middle_80_percent_of_the_residuals_and_the_forecast(points):
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    line = fit_line(xs, ys)
    residuals = sorted(y - line.intercept - line.slope * x for x, y in points)
    assert line.low_offset == pytest.approx(min(quantile(residuals, 0.1), 0.0))
    assert line.high_offset == pytest.approx(max(quantile(residuals, 0.9), 0.0))
    expected, low, high = line.predict(2.0)
    assert low - 1e-12 <= expected <= high + 1e-12
    assert fit_mean(xs, ys).slope == 0 and fit_mean(xs, ys).intercept == pytest.approx(
        statistics.fmean(ys))


def _rows(outcome_of: dict[str, float], x_of: dict[str, float], seeds: int = 2) -> list[dict]:
    return [{"pair": pair, "seed": seed, "outcome": outcome_of[pair] + 0.01 * seed,
             "measurements": {"overlap_share": x_of[pair] + 0.02 * seed, "novelty": 0.3}}
            for pair in outcome_of for seed in range(seeds)]


def test_leave_one_pair_out_never_fits_on_the_pair_it_forecasts():
    rows = _rows({"a": 0.1, "b": 0.5, "c": 0.9, "d": 0.2}, {"a": 0.1, "b": 0.5, "c": 0.9, "d": 0.3})
    seen = []

    def spying_fit(xs, ys):
        seen.append(sorted(ys))
        return fit_line(xs, ys)

    held_out = leave_one_pair_out(rows, "overlap_share", spying_fit)
    assert len(held_out) == len(rows)
    for pair, train in zip("abcd", seen, strict=True):
        want = sorted(r["outcome"] for r in rows if r["pair"] != pair)
        assert train == want
    # Brute force: each forecast is the line through the other pairs' rows, at this row's x.
    for r in held_out:
        others = [x for x in rows if x["pair"] != r["pair"]]
        line = fit_line([x["measurements"]["overlap_share"] for x in others],
                        [x["outcome"] for x in others])
        assert r["forecast"] == pytest.approx(line.predict(r["measurement"])[0])


def test_calibration_counts_the_outcomes_inside_and_the_mean_error():
    held = [{"forecast": 0.5, "low": 0.4, "high": 0.6, "outcome": 0.55},
            {"forecast": 0.2, "low": 0.1, "high": 0.3, "outcome": 0.5}]
    assert calibration(held) == pytest.approx({"mae": 0.175, "coverage": 0.5})


def test_a_measurement_that_tracks_the_outcome_beats_the_mean_and_is_chosen():
    # The outcome follows overlap_share exactly (novelty is flat): the line on overlap_share
    # forecasts every held-out pair, the mean cannot.
    rows = _rows({"a": 0.1, "b": 0.4, "c": 0.7, "d": 0.9}, {"a": 0.1, "b": 0.4, "c": 0.7, "d": 0.9})
    fit = fit_forecast(rows, {"steps": 40})
    assert fit["measurement"] == "overlap_share" and fit["beats_mean"]
    assert fit["calibration"]["candidates"]["overlap_share"]["mae"] < 0.05
    assert fit["calibration"]["mean_baseline"]["mae"] > 0.2
    shown = forecast_for({"pattern": {"value": 0.5}}, fit, {"steps": 40})
    assert shown["shown"] and shown["measurement"] == "overlap_share"
    assert shown["expected"] == pytest.approx(Line(**fit["line"]).predict(0.5)[0])
    assert shown["low"] <= shown["expected"] <= shown["high"] and shown["notes"] == []
    later = forecast_for({"pattern": {"value": 2.0}}, fit, {"steps": 200})
    assert any("outside the fitted range" in n for n in later["notes"])
    assert any("fitted on 40-step runs" in n for n in later["notes"])


def test_a_fit_that_cannot_beat_the_mean_is_not_shown():
    # The outcome is unrelated to both measurements: the line does no better than the mean.
    rows = _rows({"a": 0.9, "b": 0.1, "c": 0.8, "d": 0.2}, {"a": 0.1, "b": 0.4, "c": 0.7, "d": 0.9})
    fit = fit_forecast(rows, {"steps": 40})
    assert not fit["beats_mean"]
    found = forecast_for({"pattern": {"value": 0.5}}, fit, {"steps": 40})
    assert not found["shown"] and "does not beat predicting the mean" in found["reason"]
    assert "expected" not in found
    assert not forecast_for({}, None, {"steps": 40})["shown"]


def test_fewer_than_three_pairs_cannot_be_calibrated():
    with pytest.raises(ValueError, match="at least 3 pairs"):
        fit_forecast(_rows({"a": 0.1, "b": 0.5}, {"a": 0.1, "b": 0.5}), {})


def test_teachers_are_ranked_by_forecast_with_those_without_one_last():
    def diagnosis(verdict: str, **forecast) -> dict:
        return {"verdict": verdict, "forecast": forecast}

    rows = ranking_rows({
        "b": diagnosis("go", shown=True, expected=0.2, low=0.1, high=0.3),
        "z": diagnosis("no-novelty", shown=False, reason="no forecast.json"),
        "a": diagnosis("go", shown=True, expected=0.5, low=0.3, high=0.6),
        "c": diagnosis("pattern-mismatch", shown=True, expected=-0.1, low=-0.2, high=0.0),
    })
    assert [r[0] for r in rows] == ["a", "b", "c", "z"]
    assert rows[0] == ("a", "go", "0.50", "[0.30, 0.60]")
    assert rows[-1] == ("z", "no-novelty", "–", "no forecast.json")


def test_diagnose_forecasts_from_the_fit_and_its_measurement(tiny_pair, tmp_path, monkeypatch):
    from opd import api

    rows = _rows({"a": 0.1, "b": 0.4, "c": 0.7, "d": 0.9}, {"a": 0.1, "b": 0.4, "c": 0.7, "d": 0.9})
    fit = fit_forecast(rows, {"steps": 40, "worlds": ["test"]})
    monkeypatch.setattr("opd.doctor.measure.load_fit", lambda: fit)
    diagnosis = api.diagnose(str(tiny_pair["student"]), str(tiny_pair["teacher"]),
                             str(tiny_pair["prompts"]), out=tmp_path / "diag", num_prompts=4,
                             samples_per_prompt=2, max_new_tokens=6, progress=False,
                             train_steps=40)
    forecast = diagnosis.forecast
    share = diagnosis.checks["pattern"].value
    assert forecast["shown"] and forecast["value"] == share
    assert forecast["expected"] == pytest.approx(Line(**fit["line"]).predict(share)[0])
    saved = json.loads((tmp_path / "diag" / "diagnosis.json").read_text())
    assert saved["forecast"] == forecast == saved["teacher"]["forecast"]
    assert f"expected gap recovery {forecast['expected']:.2f}" in (
        tmp_path / "diag" / "report.md").read_text()
