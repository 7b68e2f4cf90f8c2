"""The shared leaves of opd.io: the number format people read."""

from __future__ import annotations

from opd.io import fmt


def test_fmt_writes_missing_values_booleans_and_floats_the_same_way_everywhere():
    assert [fmt(None), fmt(True), fmt(False), fmt(3), fmt("x")] == ["–", "yes", "no", "3", "x"]
    assert fmt(0.123456) == "0.123" and fmt(0.123456, ".4g") == "0.1235"
    assert fmt(-0.5, "+.3f") == "-0.500"
