"""`opd reproduce --profile quick`, every finding, as a user runs it (`make test-reproduce`,
with the quick zoo built from scratch; its time: docs/results.md#timings). Checks the report's
structure, that every verdict follows from its numbers and its rule, that the experiments ran
for real (their curves have the profile's steps, seeds differ), and that a second call resumes
from the finished experiments instead of running them again."""

from __future__ import annotations

import json

from opd.cli import main
from opd.study.experiments import PROFILES
from opd.study.findings import FINDINGS
from opd.study.stats import VERDICTS, Rule, combine, interval


def test_quick_profile_reproduces_every_finding_and_resumes(tmp_path, capsys):
    out, zoo = tmp_path / "reproduce", tmp_path / "zoo"
    assert main(["reproduce", "--profile", "quick", "--out", str(out), "--zoo", str(zoo),
                 "--no-progress"]) == 0
    summary = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    steps = PROFILES["quick"].opd_steps
    assert [f["number"] for f in summary["findings"]] == [f.number for f in FINDINGS]
    for finding in summary["findings"]:
        assert finding["verdict"] in VERDICTS
        assert f"## {finding['number']}. {finding['slug']}" in report
        assert (out / f"{finding['slug']}.png").stat().st_size > 10_000
        for claim in finding["claims"]:
            assert len(claim["per_seed"]) == 3
            value = interval(claim["per_seed"])
            assert claim["value"]["mean"] == value.mean
            assert claim["verdict"] == Rule(claim["rule_kind"], claim["rule_bound"]).verdict(value)
            assert f"| {claim['rule']} | {claim['verdict']} |" in report
        assert finding["verdict"] == combine([c["verdict"] for c in finding["claims"]])
    for name, runs in summary["experiments"].items():
        assert len(runs) == 3, name
        result = json.loads((out / "experiments" / name / "seed0" / "result.json").read_text())
        if "series" in result and not name.startswith("cold-start"):
            assert len(result["series"]["overlap_ratio"]) == steps, name
    recoveries = [r["gap_recovery"] for r in summary["experiments"]["opd-aligned"]]
    assert len(set(recoveries)) > 1 or len({r["after"] for r in summary["experiments"]["opd-foreign"]}) > 1
    print(report)
    capsys.readouterr()

    # A second call finds every experiment finished and only judges and reports again.
    assert main(["reproduce", "--profile", "quick", "--out", str(out), "--zoo", str(zoo),
                 "--only", "dynamics", "--no-progress"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["seconds"]["cached_jobs"] == len(FINDINGS[2].experiments) * 3
    assert again["findings"][0] == summary["findings"][2]
