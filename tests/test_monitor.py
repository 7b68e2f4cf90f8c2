"""The live monitor's rules on hand-made metric histories, and its stop action in the loop."""

from __future__ import annotations

import pytest

from opd.errors import OPDError
from opd.run.monitor import Monitor, MonitorThresholds, check_signatures

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


def test_monitor_fires_each_rule_once_and_only_stop_actions_stop():
    said = []
    monitor = Monitor("stop", T, echo=said.append)
    fired = [[a.rule for a in monitor.observe(record)] for record in history([0.2] * 10)]
    assert fired == [[]] * 7 + [["pattern-mismatch"], [], []]
    assert len(said) == 1 and "pattern-mismatch" in said[0] and "docs/method.md" in said[0]
    assert monitor.stops and Monitor("cold-start", T).stops
    warn = Monitor("warn", T, echo=said.append)
    assert sum(len(warn.observe(r)) for r in history([0.2] * 10)) == 1
    assert not warn.stops  # warn reports the failure and never stops
    with pytest.raises(OPDError, match="on_failure: unknown value 'explode'"):
        Monitor("explode")


@pytest.mark.parametrize(("on_failure", "steps"), [("warn", 18), ("stop", 16)])
def test_in_the_loop_warn_logs_the_alert_and_goes_on_while_stop_stops(tiny_pair, tmp_path,
                                                                      on_failure, steps):
    """Two unrelated random models and a learning rate too small to move them: low, flat
    overlap, so the pattern rule fires at step 16 (two windows of 8); warn trains to the end,
    stop checkpoints and stops there."""
    from opd import metrics as M
    from opd.run.folder import RunFolder
    from opd.run.loop import run_training
    from tests.support import tiny_config

    out = tmp_path / on_failure
    summary = run_training(tiny_config(tiny_pair, out, max_steps=18, save_every=100, lr=1e-9,
                                       on_failure=on_failure))
    records = M.read(out)
    assert len(records) == steps
    assert [r["step"] for r in records if M.ALERTS in r] == [16]
    assert records[15][M.ALERTS][0]["rule"] == "pattern-mismatch"
    assert summary["stopped_early_at"] == (16 if on_failure == "stop" else None)
    assert RunFolder(out).complete_checkpoints()[-1].name == f"step-{steps:06d}"
