"""Refresh the forecast of `opd diagnose` (docs/diagnose.md#forecast): diagnose and run OPD for
every pair of each world's zoo and seed, fit the forecast on the rows, calibrate it leave one
pair out and leave one world out, and write src/opd/doctor/forecast.json and the calibration
table for docs/results.md.

The runs are `opd reproduce`'s experiments (40-step OPD of the `cpu-small` profile on
`teacher-train`, diagnoses of 32 prompts), kept in --out/<world> as they finish, so running it
again resumes (a world's zoo is built only when some of its runs are missing). The worlds are
`opd reproduce`'s profiles: `quick` (the zoo's addition) and `choice` (genuine choice of words).

    python bench/forecast.py --zoo .opd-cache/zoo --out runs/forecast --seeds 2 --worlds quick,choice
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from opd.doctor.forecast import (
    FORECAST_FILE,
    MEASUREMENTS,
    calibration,
    fit_forecast,
    fit_line,
    fit_mean,
    leave_one_pair_out,
)
from opd.io import fmt, write_text_atomic
from opd.lab.zoo import build_zoo_stages
from opd.study.experiments import PROFILES, JobContext, read_result, run_jobs, zoo_models

PAIRS = {
    "aligned": ("opd-aligned", "diagnose-aligned"),
    "foreign": ("opd-foreign", "diagnose-foreign"),
    "same-pipeline": ("opd-same-pipeline", "diagnose-same-pipeline"),
    "template2": ("opd-template2", "diagnose-template2"),
    "reverse": ("opd-reverse", "diagnose-reverse"),
}
"""Pair → (its OPD run, its diagnosis), experiments of opd.study.experiments."""
WORLDS = ("quick", "choice")
"""The worlds a fit can draw on: `opd reproduce` profiles of 40-step runs."""
MIN_GAP = 0.1
"""Smallest |teacher − student| accuracy on the judged set for a row to enter the fit: below
it gap recovery is a ratio of noise (the same-pipeline teacher leads by 0.03 on its set, one
problem in thirty, and recovers −2)."""


def row(pair: str, seed: int, run: dict[str, Any], diagnosis: dict[str, Any],
        world: str) -> dict[str, Any]:
    """One row: the pair's diagnosis measurements and the run's gap recovery (the pair named
    with its world, so that leaving a pair out leaves out that world's pair only)."""
    checks = diagnosis["checks"]
    return {"pair": f"{world}/{pair}", "world": world, "seed": seed,
            "outcome": run["gap_recovery"],
            "gap": run["teacher"] - run["before"], "eval_set": run["eval_set"],
            "measurements": {"overlap_share": checks["pattern"], "novelty": checks.get("novelty")},
            "verdict": diagnosis["verdict"]}


def table(fit: dict[str, Any], left_out: list[dict[str, Any]]) -> str:
    """The calibration table: every held-out row's forecast, interval and outcome."""
    name = fit["measurement"]
    cal = fit["calibration"]
    lines = [f"measurement: {name}; line: outcome = {fit['line']['intercept']:.3f} + "
             f"{fit['line']['slope']:.3f} × {name}; beats the mean: {fmt(fit['beats_mean'])}", "",
             "| pair | seed | " + name + " | forecast [80% interval], left out | mean baseline "
             "[80% interval] | outcome |", "|---|---|---|---|---|---|"]
    baseline = {(r["pair"], r["seed"]): r for r in cal["mean_baseline"]["held_out"]}
    for r in cal["candidates"][name]["held_out"]:
        b = baseline[(r["pair"], r["seed"])]
        lines.append(f"| {r['pair']} | {r['seed']} | {r['measurement']:.3f} | {r['forecast']:.3f} "
                     f"[{r['low']:.3f}, {r['high']:.3f}] | {b['forecast']:.3f} [{b['low']:.3f}, "
                     f"{b['high']:.3f}] | {r['outcome']:.3f} |")
    lines += ["", "| model | held-out MAE | share inside the 80% interval |", "|---|---|---|"]
    for candidate, c in cal["candidates"].items():
        lines.append(f"| line on {candidate} | {c['mae']:.3f} | {c['coverage']:.2f} |")
    lines.append(f"| mean of the other pairs | {cal['mean_baseline']['mae']:.3f} | "
                 f"{cal['mean_baseline']['coverage']:.2f} |")
    for r in left_out:
        lines.append(f"\nnot fitted: {r['pair']} seed {r['seed']} (gap {r['gap']:.3f} < {MIN_GAP}, "
                     f"recovery {r['outcome']:.3f})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default=".opd-cache/zoo", help="zoo cache folder")
    parser.add_argument("--out", default="runs/forecast")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pairs", default=",".join(PAIRS),
                        help="comma-separated pairs to run and fit (default: all of "
                        + ", ".join(PAIRS) + ")")
    parser.add_argument("--worlds", default="quick",
                        help="comma-separated worlds (opd reproduce profiles): "
                        + ", ".join(WORLDS))
    parser.add_argument("--write", type=Path, default=FORECAST_FILE,
                        help="where the fit goes (default: the package's forecast.json)")
    args = parser.parse_args()
    worlds = args.worlds.split(",")
    unknown = [name for name in args.pairs.split(",") if name not in PAIRS]
    if unknown:
        parser.error(f"--pairs: unknown pair {unknown[0]!r}; choose from {', '.join(PAIRS)}")
    if [w for w in worlds if w not in WORLDS]:
        parser.error(f"--worlds: choose from {', '.join(WORLDS)}")
    pairs = {name: PAIRS[name] for name in args.pairs.split(",")}
    names = [name for pair in pairs.values() for name in pair]
    rows = []
    for world in worlds:
        profile, out = PROFILES[world], Path(args.out) / world
        jobs = [(n, s) for n in names for s in range(args.seeds) if read_result(out, n, s) is None]
        if jobs:
            zoo = build_zoo_stages(Path(args.zoo) / profile.zoo, profile.zoo,
                                   only=zoo_models(names))
            zoo["root"] = str(Path(args.zoo) / profile.zoo)
            for result in run_jobs(JobContext(zoo, profile, str(out)), jobs, args.workers):
                print(f"{world}: {result['experiment']} seed {result['seed']}: "
                      f"{result['seconds']:.0f} s", flush=True)
        rows += [row(pair, seed, read_result(out, run, seed), read_result(out, diag, seed), world)
                 for pair, (run, diag) in pairs.items() for seed in range(args.seeds)]
    fitted = [r for r in rows if abs(r["gap"]) >= MIN_GAP]
    profile = PROFILES[worlds[0]]
    conditions = {"worlds": worlds, "steps": profile.opd_steps, "profile": "cpu-small",
                  "objective": "topk (k=8, student set, student_p)", "prompts": "teacher-train",
                  "diagnosis_prompts": profile.diagnose_prompts, "seeds": args.seeds,
                  "candidates": list(MEASUREMENTS), "min_gap": MIN_GAP,
                  "not_fitted": [r for r in rows if abs(r["gap"]) < MIN_GAP]}
    if len({r["pair"] for r in fitted}) < 3:
        for r in rows:
            print(f"{r['pair']} seed {r['seed']}: gap {r['gap']:.3f}, recovery {r['outcome']:.3f}, "
                  f"measurements {r['measurements']}")
        raise SystemExit(f"bench/forecast.py: only {len({r['pair'] for r in fitted})} pair(s) "
                         f"with a gap of at least {MIN_GAP}: too few to calibrate (3 needed); "
                         f"{args.write} was left as it was")
    fit = fit_forecast(fitted, conditions)
    write_text_atomic(args.write, json.dumps(fit, indent=1) + "\n")
    print(table(fit, conditions["not_fitted"]))
    if len({r["world"] for r in fitted}) > 1:
        print_world_calibration(fitted, fit["measurement"])


def print_world_calibration(rows: list[dict[str, Any]], measurement: str) -> None:
    """Leave one world out: the line fitted on the other worlds' rows, judged on the world left
    out, beside the mean of the other worlds' outcomes (the pairs renamed by their world, so
    that leaving a 'pair' out leaves out the whole world)."""
    by_world = [{**r, "pair": r["world"]} for r in rows]
    line = calibration(leave_one_pair_out(by_world, measurement, fit_line))
    mean = calibration(leave_one_pair_out(by_world, measurement, fit_mean))
    print(f"\nleave one world out ({measurement}): line MAE {line['mae']:.3f}, coverage "
          f"{line['coverage']:.2f}; mean of the other world MAE {mean['mae']:.3f}, coverage "
          f"{mean['coverage']:.2f}")


if __name__ == "__main__":
    main()
