"""The study's measures against direct computations, and their aggregation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.metrics import TOKEN_MEASURES
from opd.step.measures import means_from_totals, position_bin_edges, position_totals, token_measures
from tests.support import brute_topk, random_log_probs


def direct_measures(p_row: list[float], q_row: list[float], target: int, k: int) -> dict:
    k = min(k, len(p_row))
    shared = brute_topk(p_row, k) & brute_topk(q_row, k)
    p = [math.exp(x) for x in p_row]
    q = [math.exp(x) for x in q_row]
    if shared:
        ps, qs = sum(p[v] for v in shared), sum(q[v] for v in shared)
        adv = sum((p[v] / ps) * (math.log(q[v] / qs) - math.log(p[v] / ps)) for v in shared)
        adv /= len(shared)
    else:
        adv = math.nan
    hp = -sum(x * math.log(x) for x in p if x > 0)
    hq = -sum(x * math.log(x) for x in q if x > 0)
    return {
        "overlap_ratio": len(shared) / k,
        "overlap_token_advantage": adv,
        "entropy_gap": abs(hq - hp),
        "overlap_mass_student": sum(p[v] for v in shared),
        "overlap_mass_teacher": sum(q[v] for v in shared),
        "student_entropy": hp,
        "teacher_entropy": hq,
        "reverse_kl": p_row[target] - q_row[target],
    }


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), v=st.integers(2, 10), k=st.integers(1, 12), ties=st.booleans())
def test_token_measures_equal_direct_computation(seed, v, k, ties):
    p, q = random_log_probs(seed, 4, v, ties), random_log_probs(seed + 7, 4, v, ties)
    targets = torch.randint(0, v, (4,), generator=torch.Generator().manual_seed(seed))
    got = token_measures(p, q, targets, k)
    assert set(got) == set(TOKEN_MEASURES)
    for row in range(4):
        want = direct_measures(p[row].tolist(), q[row].tolist(), int(targets[row]), k)
        for name, value in want.items():
            if math.isnan(value):
                assert math.isnan(float(got[name][row])), name
            else:
                assert float(got[name][row]) == pytest.approx(value, abs=1e-9), name


def test_identical_distributions_overlap_fully_with_zero_advantage():
    p = random_log_probs(0, 3, 20)
    got = token_measures(p, p, torch.zeros(3, dtype=torch.long), 4)
    torch.testing.assert_close(got["overlap_ratio"], torch.ones(3, dtype=torch.float64))
    assert got["overlap_token_advantage"].abs().max() < 1e-12
    assert got["entropy_gap"].abs().max() < 1e-12


def test_totals_skip_masked_and_nan_positions_and_bin_by_position():
    values = {"a": torch.tensor([1.0, 3.0, math.nan, 5.0]), "b": torch.tensor([0.0, 0.0, 1.0, 1.0])}
    positions = torch.tensor([0, 1, 2, 7])
    edges = position_bin_edges(8, 2)  # [0, 4]
    assert edges == [0, 4]
    sums, counts = position_totals(values, positions, edges)
    overall, by_position = means_from_totals(["a", "b"], sums, counts)
    assert overall == {"a": 3.0, "b": 0.5}
    assert by_position["a"] == [2.0, 5.0]
    assert by_position["b"] == [pytest.approx(1 / 3), 1.0]
    # Totals add across parts (micro-batches, processes) before dividing.
    s1, c1 = position_totals({"a": values["a"][:2]}, positions[:2], edges)
    s2, c2 = position_totals({"a": values["a"][2:]}, positions[2:], edges)
    assert means_from_totals(["a"], s1 + s2, c1 + c2)[0]["a"] == 3.0


def test_empty_bins_are_none():
    sums, counts = position_totals({"a": torch.tensor([1.0])}, torch.tensor([0]), [0, 4])
    assert means_from_totals(["a"], sums, counts)[1]["a"] == [1.0, None]
