"""The live monitor's rules on hand-made metric histories, and its stop action in the loop."""

from __future__ import annotations

import pytest

from opd.errors import OPDError
from opd.monitor import Monitor, MonitorThresholds, check_signatures

T = MonitorThresholds(window=4)


def history(overlap, truncation=None, tail=None, front=None):
    records = []
    for step, value in enumerate(overlap, start=1):
        record = {"step": step, "overlap_ratio": value, "overlap_token_advantage": -0.1,
                  "truncation_rate": truncation[step - 1] if truncation else 0.0}
        if tail:
            record["by_position"] = {"student_entropy": [front[step - 1], 1.0, tail[step - 1]]}
        records.append(record)
    return records


def rules(records):
    return [a.rule for a in check_signatures(records, T)]


def test_nothing_is_judged_before_two_windows():
    assert rules(history([0.1] * 7)) == []


def test_low_flat_overlap_is_a_pattern_mismatch():
    alerts = check_signatures(history([0.2] * 8), T)
    assert [a.rule for a in alerts] == ["pattern-mismatch"]
    assert alerts[0].evidence["overlap_ratio"] == pytest.approx(0.2)
    assert "cold-start" in alerts[0].recipe


def test_low_but_rising_overlap_and_high_overlap_are_quiet():
    assert rules(history([0.1] * 4 + [0.3] * 4)) == []
    assert rules(history([0.8] * 8)) == []


def test_truncation_jump_is_a_format_collapse():
    trunc = [0.0] * 4 + [0.9] * 4
    assert "format-collapse" in rules(history([0.8] * 8, truncation=trunc))


def test_tail_entropy_rising_before_the_front():
    tail = [1.0] * 4 + [2.0] * 4
    front = [1.0] * 8
    assert rules(history([0.8] * 8, tail=tail, front=front)) == ["tail-entropy"]
    assert rules(history([0.8] * 8, tail=tail, front=[1.0] * 4 + [2.5] * 4)) == []


def test_monitor_fires_each_rule_once_and_stops_when_asked():
    said = []
    monitor = Monitor("stop", T, echo=said.append)
    decisions = [monitor(record) for record in history([0.2] * 10)]
    assert decisions == [False] * 7 + [True, False, False]
    assert len(said) == 1 and "pattern-mismatch" in said[0]
    assert Monitor("warn", T, echo=said.append)  # warn never stops
    with pytest.raises(OPDError, match="on_failure: unknown value 'explode'"):
        Monitor("explode")
