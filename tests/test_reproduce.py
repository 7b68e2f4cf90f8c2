"""`opd reproduce`'s pure parts: intervals against brute force, the rules' three-way verdicts,
every finding judged and reported from synthetic results, and the errors a user can meet. The
experiments themselves run on the zoo in tests_reproduce/ (`make test-reproduce`)."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opd.cli import main
from opd.errors import OPDError
from opd.study.experiments import EXPERIMENTS, PROBE_K, PROFILES, SERIES, OPDRun, eval_set
from opd.study.findings import ALL_FINDINGS, FINDINGS, judge
from opd.study.report import markdown, pairs_table, write_report
from opd.study.run import chosen_findings
from opd.study.stats import (
    DOES_NOT,
    INCONCLUSIVE,
    REPRODUCES,
    Interval,
    Rule,
    combine,
    interval,
    t_quantile,
)


@pytest.mark.parametrize(("df", "expected"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (29, 2.0452),
                                              (1000, 1.9623)])
def test_t_quantile_matches_the_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)


@given(st.lists(st.floats(-10, 10), min_size=2, max_size=8))
def test_interval_is_the_mean_plus_minus_t_standard_errors(values):
    found = interval(values)
    half = t_quantile(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    assert found.mean == pytest.approx(statistics.fmean(values), abs=1e-9)
    assert found.low == pytest.approx(found.mean - half, abs=1e-9)
    assert found.high == pytest.approx(found.mean + half, abs=1e-9)


def test_one_seed_gives_an_unbounded_interval_and_no_decision():
    value = interval([0.7])
    assert value.low == -math.inf and value.high == math.inf
    assert value.as_dict()["low"] is None
    assert {Rule(kind, 0.1).verdict(value) for kind in ("above", "below", "within")} == {INCONCLUSIVE}


@given(st.floats(-2, 2), st.floats(0, 2), st.sampled_from(["above", "below", "within"]), st.floats(0, 1))
def test_a_rule_decides_only_when_the_whole_interval_is_on_one_side(low, width, kind, bound):
    value = Interval((2 * low + width) / 2, low, low + width, 3)
    points = [low + width * i / 20 for i in range(21)]  # brute force: the claim at each point

    def holds(x: float) -> bool:
        return {"above": x > bound, "below": x < bound, "within": -bound < x < bound}[kind]

    verdict = Rule(kind, bound).verdict(value)
    if verdict == REPRODUCES:
        assert all(holds(x) for x in points)
    elif verdict == DOES_NOT:
        assert not any(holds(x) for x in points)
    elif kind == "within":  # inconclusive: the interval reaches across an edge of ±bound
        assert low <= -bound <= low + width or low <= bound <= low + width
    else:
        assert low <= bound <= low + width


def test_a_finding_needs_every_claim_and_falls_with_any():
    assert combine([REPRODUCES, REPRODUCES]) == REPRODUCES
    assert combine([REPRODUCES, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([INCONCLUSIVE, DOES_NOT, REPRODUCES]) == DOES_NOT


def _synthetic_results(seeds: int = 3, steps: int = 12) -> dict:
    """Every experiment's result with random numbers of the right shape."""
    rng = random.Random(0)

    def series() -> dict:
        return {m: [rng.random() - (0.5 if m == "overlap_token_advantage" else 0) for _ in range(steps)]
                for m in SERIES}

    def by_k() -> dict:
        keys = ("overlap_ratio", "overlap_mass_student", "overlap_mass_teacher", "overlap_share_student",
                "overlap_share_teacher", "overlap_token_advantage")
        return {str(k): {key: rng.random() for key in keys} for k in PROBE_K}

    def diagnosis() -> dict:
        return {"by_k": by_k(), "auroc": rng.random(), "verdict": "go",
                "continuation": [{"depth": d, "tokens": 3, "advantage": rng.random(),
                                  "teacher_accuracy": 0.9, "student_accuracy": 0.1}
                                 for d in (0, 0.25, 0.5, 0.75)]}

    results = {}
    for name, spec in EXPERIMENTS.items():
        rows = []
        for seed in range(seeds):
            row = {"experiment": name, "seed": seed, "seconds": 1.0}
            if isinstance(spec, OPDRun) or name.startswith("cold-start"):
                before, teacher, after = 0.1, 0.9, rng.random()
                row |= {"eval_set": "eval-chain-d2", "before": before, "teacher": teacher,
                        "after": after, "gap_recovery": (after - before) / (teacher - before),
                        "series": series(), "after_sft": rng.random()}
                if getattr(spec, "probe", False):
                    row["probe_after"] = {"by_k": by_k()}
            elif name.startswith("diagnose"):
                row |= diagnosis()
            else:
                row |= {"step0_overlap": {k: rng.random() for k in ("student_template", "teacher_template",
                                                                     "all_candidates", "selected")},
                        "entropy_change": {k: rng.random() for k in ("kept_only", "selected", "unselected")},
                        "entropy": {k: [rng.random() for _ in range(5)]
                                    for k in ("kept_only", "selected", "unselected")}}
            rows.append(row)
        results[name] = rows
    return results


def test_every_verdict_follows_from_its_numbers_and_rule():
    results, profile = _synthetic_results(), PROFILES["quick"]
    for finding in ALL_FINDINGS:
        judged = judge(finding, results, profile)
        for claim, spec in zip(judged["claims"], finding.claims, strict=True):
            assert claim["per_seed"] == spec.values(results, profile)
            assert claim["verdict"] == spec.rule.verdict(interval(claim["per_seed"]))
        assert judged["verdict"] == combine([c["verdict"] for c in judged["claims"]])


def test_gap_recovery_of_one_teacher_decides_the_compatibility_claim():
    results, profile = _synthetic_results(), PROFILES["quick"]
    for row, recovery in zip(results["opd-aligned"], (0.48, 0.5, 0.52), strict=True):
        row["gap_recovery"] = recovery
    claim = judge(FINDINGS[0], results, profile)["claims"][0]
    assert claim["verdict"] == REPRODUCES
    assert claim["value"]["mean"] == pytest.approx(0.5)


def test_teacher_share_is_the_gain_lost_without_the_teacher_over_the_gain():
    # Aligned recovers 0.4 per seed; the constant control 0.1, 0.2, 0.0 → shares 0.75, 0.5, 1.0;
    # the shuffled control as much as the teacher → share 0: the claim cannot hold.
    results, profile = _synthetic_results(), PROFILES["quick"]
    for name, values in (("opd-aligned", (0.4, 0.4, 0.4)), ("opd-aligned-constant", (0.1, 0.2, 0.0)),
                         ("opd-aligned-shuffled", (0.4, 0.4, 0.4))):
        for row, recovery in zip(results[name], values, strict=True):
            row["gap_recovery"] = recovery
    finding = next(f for f in ALL_FINDINGS if f.slug == "teacher-dependence")
    constant, shuffled = judge(finding, results, profile)["claims"]
    assert constant["per_seed"] == pytest.approx([0.75, 0.5, 1.0])
    assert shuffled["per_seed"] == pytest.approx([0.0, 0.0, 0.0])
    assert shuffled["verdict"] == DOES_NOT


def test_report_has_a_section_a_figure_and_the_numbers_of_every_finding(tmp_path, saved_figures):
    results, profile = _synthetic_results(), PROFILES["quick"]
    judged = [judge(f, results, profile) for f in ALL_FINDINGS]
    summary = {"profile": profile.__dict__, "seeds": 3, "workers": 2,
               "zoo": {"profile": "quick", "root": "zoo", "seconds": 0.0, "accuracy": {}},
               "seconds": {"total_this_call": 10.0, "cached_jobs": 0,
                           "experiments": {n: [1.0] * 3 for n in results}},
               "findings": judged, "experiments": {}}
    write_report(tmp_path, summary, results)
    text = (tmp_path / "report.md").read_text()
    for finding in judged:
        assert f"## {finding['number']}. {finding['slug']}" in text
        assert (tmp_path / f"{finding['slug']}.png").stat().st_size > 0
        for claim in finding["claims"]:
            assert f"| {claim['verdict']} |" in text
    assert "k=16" in text  # the overlap at every k, for finding 3
    # The figures draw the experiments' numbers: a bar per run at its mean over the seeds; each
    # seed's curve by step, then their mean.
    for slug, runs in (("compatibility", ["opd-aligned", "opd-foreign"]),
                       ("granularity", ["opd-sampled", "opd-top1", "opd-top4", "opd-top16",
                                        "opd-top64"])):
        bars = saved_figures[f"{slug}.png"].axes[0].patches
        assert [bar.get_height() for bar in bars] == pytest.approx(
            [statistics.mean(r["gap_recovery"] for r in results[run]) for run in runs]), slug
    student_mass = saved_figures["overlap-mass.png"].axes[0].lines
    seeds = [r["series"]["overlap_mass_student"] for r in results["opd-aligned"]]
    assert [list(line.get_ydata()) for line in student_mass[:3]] == seeds
    assert list(student_mass[3].get_ydata()) == pytest.approx(
        [statistics.mean(step) for step in zip(*seeds, strict=True)])
    assert json.loads((tmp_path / "results.json").read_text())["findings"] == judged
    assert markdown(summary, results) == text


def test_findings_are_chosen_by_number_or_name():
    assert [f.number for f in chosen_findings(("dynamics", "4", "signal"))] == [3, 4, 5]
    assert chosen_findings(()) == list(FINDINGS) and len(FINDINGS) == 8  # the study's
    assert [f.number for f in chosen_findings(("teacher-dependence", "1"))] == [1, 9]
    with pytest.raises(OPDError, match="only: unknown finding '10'; choose numbers 1–9"):
        chosen_findings(("10",))


def test_a_run_is_judged_where_teacher_and_student_differ_most():
    zoo = {"eval_groups": {"student": ["own-d2", "own-d3"], "subskill": ["chain-d2", "chain-d3"]},
           "models": {"s": {"accuracy": {"student": 0.9, "subskill": 0.0}},
                      "t": {"accuracy": {"student": 1.0, "subskill": 0.8}},
                      "same": {"accuracy": {"student": 1.0, "subskill": 0.0}}}}
    assert eval_set(zoo, "s", "t") == "chain-d3"
    assert eval_set(zoo, "s", "same") == "own-d3"  # it trails by more on chains, leads on own
    assert eval_set(zoo, "t", "s", leader="student") == "chain-d3"


def test_cli_refuses_an_unknown_finding_in_one_line(tmp_path, capsys):
    assert main(["reproduce", "--only", "7,nine", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "only: unknown finding 'nine'" in err
    assert not (tmp_path / "r").exists()


def test_cli_refuses_to_mix_profiles_in_one_folder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    out.mkdir()
    (out / "reproduce.json").write_text(json.dumps({"profile": "full", "zoo_code_version": {}}))
    monkeypatch.setattr("opd.lab.zoo.build_zoo_stages",
                        lambda *a, **k: {"code_version": {}, "profile": "quick"})
    assert main(["reproduce", "--only", "4", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds a reproduction made with another profile ('full')" in err
    assert sorted(p.name for p in out.iterdir()) == ["reproduce.json"]


def test_report_sets_the_doctors_verdict_the_outcome_and_the_alerts_side_by_side():
    results = _synthetic_results(seeds=2)
    results["diagnose-foreign"][1]["verdict"] = "pattern-mismatch"
    results["opd-foreign"][1] |= {"gap_recovery": -0.04, "alerts": ["pattern-mismatch@16"]}
    results["cold-start-foreign"][0] |= {"gap_recovery": 0.9, "gate_passed": True,
                                         "alerts": ["pattern-mismatch@16", "entropy-tail@24"]}
    text = "\n".join(pairs_table(results))
    assert "| teacher-foreign | 1 | pattern-mismatch | -0.040 | pattern-mismatch@16 |" in text
    assert ("| teacher-foreign, cold start first | 0 | go | 0.900 (gate passed) | "
            "pattern-mismatch@16, entropy-tail@24 |") in text
    assert text.count("| teacher-aligned |") == 2 and "| none |" in text
    del results["opd-aligned"], results["opd-foreign"], results["cold-start-foreign"]
    assert pairs_table(results) == []
