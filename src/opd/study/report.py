"""report.md, results.json and one figure per finding, from the judged findings and the
experiments' per-seed results."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from opd import metrics as M
from opd.io import fmt, write_text_atomic
from opd.run.report import pyplot, save_figure
from opd.study.experiments import PROBE_K, ReproduceProfile
from opd.study.findings import Results
from opd.study.stats import interval

COLOURS = {"opd-aligned": "tab:green", "opd-foreign": "tab:red", "cold-start-foreign": "tab:blue",
           "diagnose-aligned": "tab:green", "diagnose-foreign": "tab:red"}


def _interval_text(value: Mapping[str, Any]) -> str:
    if value["low"] is None:
        return f"{fmt(value['mean'])} (one seed)"
    return f"{fmt(value['mean'])} [{fmt(value['low'])}, {fmt(value['high'])}]"


def _seeds_text(values: Sequence[float]) -> str:
    return ", ".join(fmt(v) for v in values)


# -- figures ----------------------------------------------------------------------------------
def _mean_curve(runs: Sequence[Mapping[str, Any]], metric: str) -> tuple[list[int], list[float]]:
    rows = [r["series"][metric] for r in runs]
    steps = range(min(len(r) for r in rows))
    mean = []
    for i in steps:
        values = [r[i] for r in rows if r[i] is not None]
        mean.append(sum(values) / len(values) if values else math.nan)
    return [i + 1 for i in steps], mean


def _curves(ax: Any, results: Results, names: Sequence[str], metric: str, title: str) -> None:
    for name in names:
        colour = COLOURS.get(name)
        for run in results[name]:
            values = run["series"][metric]
            ax.plot(range(1, len(values) + 1), [math.nan if v is None else v for v in values],
                    color=colour, alpha=0.2, linewidth=0.8)
        steps, mean = _mean_curve(results[name], metric)
        ax.plot(steps, mean, color=colour, label=name, linewidth=1.8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.legend(fontsize=7)


def _bars(ax: Any, labels: Sequence[str], per_seed: Sequence[Sequence[float]], title: str) -> None:
    for i, values in enumerate(per_seed):
        value = interval(values)
        ax.bar(i, value.mean, color="tab:gray", alpha=0.6)
        if math.isfinite(value.low):
            error = [[value.mean - value.low], [value.high - value.mean]]
            ax.errorbar(i, value.mean, yerr=error, color="black", capsize=3)
        ax.scatter([i] * len(values), values, color="black", s=8, zorder=3)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)


def _recovery_figure(results: Results, names: Sequence[str], title: str) -> Any:
    fig, ax = pyplot().subplots(figsize=(1.2 * len(names) + 2, 3.2))
    _bars(ax, [n.removeprefix("opd-") for n in names],
          [[r["gap_recovery"] for r in results[n]] for n in names],
          f"{title}: gap recovery (mean, 95% interval, seeds)")
    return fig


def _dynamics_figure(results: Results, profile: ReproduceProfile) -> Any:
    fig, axes = pyplot().subplots(2, 2, figsize=(9, 6))
    runs = ["opd-aligned", "opd-foreign"]
    _curves(axes[0, 0], results, runs, M.OVERLAP_RATIO, "overlap ratio (top-k of training)")
    _curves(axes[0, 1], results, runs, M.OVERLAP_TOKEN_ADVANTAGE, "overlap-token advantage")
    _curves(axes[1, 0], results, runs, M.ENTROPY_GAP, "entropy gap")
    ax = axes[1, 1]
    for run, before in (("opd-aligned", "diagnose-aligned"), ("opd-foreign", "diagnose-foreign")):
        for when, rows, style in (("before", results[before], "--"),
                                  ("after", [r["probe_after"] for r in results[run]], "-")):
            means = [sum(r["by_k"][str(k)][M.OVERLAP_RATIO] for r in rows) / len(rows) for k in PROBE_K]
            ax.plot(PROBE_K, means, style, marker="o", color=COLOURS[run], label=f"{run} {when}")
    ax.set_xscale("log", base=2)
    ax.set_title("overlap ratio at each k, before and after", fontsize=9)
    ax.set_xlabel("k", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _mass_figure(results: Results, profile: ReproduceProfile) -> Any:
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.2))
    runs = ["opd-aligned", "opd-foreign"]
    _curves(axes[0], results, runs, M.OVERLAP_MASS_STUDENT, "student mass on the shared top-k")
    _curves(axes[1], results, runs, M.OVERLAP_MASS_TEACHER, "teacher mass on the shared top-k")
    fig.tight_layout()
    return fig


def _recipes_figure(results: Results, profile: ReproduceProfile) -> Any:
    fig, axes = pyplot().subplots(1, 3, figsize=(12, 3.4))
    _curves(axes[0], results, ["opd-foreign", "cold-start-foreign"], M.OVERLAP_RATIO,
            "overlap ratio: plain OPD vs after the cold start")
    selections = results["select-prompts-template2"]
    kinds = ("student_template", "teacher_template", "all_candidates", "selected")
    _bars(axes[1], [k.replace("_", " ") for k in kinds],
          [[s["step0_overlap"][k] for s in selections] for k in kinds], "step-0 overlap ratio")
    lowest = min(s["step0_overlap"][k] for s in selections for k in kinds)
    axes[1].set_ylim(bottom=max(0.0, lowest - 0.05))
    trials = (("kept_only", "kept only", "tab:purple"), ("selected", "kept + mixed in", "tab:blue"),
              ("unselected", "not kept", "tab:gray"))
    for trial, label, colour in trials:
        rows = [s["entropy"][trial] for s in selections]
        steps = range(min(len(r) for r in rows))
        axes[2].plot([i + 1 for i in steps], [sum(r[i] for r in rows) / len(rows) for i in steps],
                     color=colour, label=label)
    axes[2].set_title("student entropy in the trials", fontsize=9)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _horizons_figure(results: Results, profile: ReproduceProfile) -> Any:
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.2))
    for name in ("diagnose-aligned", "diagnose-foreign"):
        for r in results[name]:
            axes[0].plot([p["depth"] for p in r["continuation"]], [p["advantage"] for p in r["continuation"]],
                         color=COLOURS[name], alpha=0.3)
        curves = [[p["advantage"] for p in r["continuation"]] for r in results[name]]
        depths = [p["depth"] for p in results[name][0]["continuation"]]
        axes[0].plot(depths, [sum(c) / len(c) for c in zip(*curves, strict=True)], marker="o",
                     color=COLOURS[name], label=name.removeprefix("diagnose-"))
    axes[0].set_title("teacher's continuation advantage by depth", fontsize=9)
    axes[0].set_xlabel("depth (share of the student's response)", fontsize=8)
    axes[0].legend(fontsize=7)
    _bars(axes[1], ["aligned", "foreign"],
          [[r["auroc"] for r in results[n]] for n in ("diagnose-aligned", "diagnose-foreign")],
          "AUROC of the sequence-level reward")
    fig.tight_layout()
    return fig


FIGURES: dict[str, Callable[[Results, ReproduceProfile], Any]] = {
    "compatibility": lambda r, p: _recovery_figure(r, ["opd-aligned", "opd-foreign"], "compatibility"),
    "novelty": lambda r, p: _recovery_figure(r, ["opd-aligned", "opd-same-pipeline"], "novelty"),
    "dynamics": _dynamics_figure,
    "overlap-mass": _mass_figure,
    "signal": lambda r, p: _recovery_figure(
        r, ["opd-aligned", "opd-overlap-only", "opd-non-overlap-only"], "where the signal lives"),
    "granularity": lambda r, p: _recovery_figure(
        r, ["opd-sampled", "opd-top1", "opd-top4", "opd-top16", "opd-top64"], "granularity"),
    "recipes": _recipes_figure,
    "horizons": _horizons_figure,
    "teacher-dependence": lambda r, p: _recovery_figure(
        r, ["opd-aligned", "opd-aligned-constant", "opd-aligned-shuffled", "opd-foreign",
            "opd-foreign-constant", "opd-foreign-shuffled"], "does the teacher matter"),
}


# -- markdown ---------------------------------------------------------------------------------
def _overlap_by_k_table(results: Results) -> list[str]:
    """The overlap at each k, before and after, for both runs: what the issue of the overlap
    that does not rise asks to see."""
    lines = ["| run | measure | " + " | ".join(f"k={k}" for k in PROBE_K) + " |",
             "|---|---|" + "---|" * len(PROBE_K)]
    for run, before in (("opd-aligned", "diagnose-aligned"), ("opd-foreign", "diagnose-foreign")):
        for key, label in ((M.OVERLAP_RATIO, "overlap ratio"),
                           ("overlap_share_student", "overlap share (student mass)")):
            cells = []
            for k in PROBE_K:
                b = sum(r["by_k"][str(k)][key] for r in results[before]) / len(results[before])
                a = sum(r["probe_after"]["by_k"][str(k)][key] for r in results[run]) / len(results[run])
                cells.append(f"{fmt(b)} → {fmt(a)}")
            lines.append(f"| {run.removeprefix('opd-')} | {label} | " + " | ".join(cells) + " |")
    return lines


PAIRS = (("teacher-aligned", "diagnose-aligned", "opd-aligned"),
         ("teacher-foreign", "diagnose-foreign", "opd-foreign"),
         ("teacher-foreign, cold start first", "diagnose-foreign", "cold-start-foreign"))
"""(pair, the diagnosis before, the run after) rows of the pairs table."""


def pairs_table(results: Results) -> list[str]:
    """Per pair and seed: the doctor's verdict before the run, the run's outcome and the live
    monitor's alerts during it, side by side, so that a disagreement is in plain sight."""
    lines = ["| pair | seed | doctor's verdict before | gap recovery after | monitor's alerts |",
             "|---|---|---|---|---|"]
    for pair, before, run in PAIRS:
        if before not in results or run not in results:
            continue
        for diagnosis, outcome in zip(results[before], results[run], strict=True):
            gate = ("" if "gate_passed" not in outcome
                    else f" (gate {'passed' if outcome['gate_passed'] else 'failed'})")
            lines.append(f"| {pair} | {outcome['seed']} | {diagnosis['verdict']} | "
                         f"{fmt(outcome['gap_recovery'])}{gate} | "
                         f"{', '.join(outcome.get('alerts', [])) or 'none'} |")
    return lines if len(lines) > 2 else []


def markdown(summary: Mapping[str, Any], results: Results) -> str:
    profile = summary["profile"]
    lines = [
        "# The study's findings, reproduced on the zoo", "",
        f"`opd reproduce --profile {profile['name']}`: the {summary['zoo']['profile']} zoo, OPD runs of "
        f"{profile['opd_steps']} steps (`cpu-small`), {summary['seeds']} seeds per experiment "
        "(the zoo is built once; a seed changes the rollouts, the prompt order and the samples of "
        "the diagnoses). Each value is the mean over seeds with its 95% t interval. Each claim's "
        "rule was fixed before the runs (docs/method.md#reproduce): *reproduces* when the whole "
        "interval satisfies it, *does not* when the whole interval contradicts it, "
        "*inconclusive* when it straddles the bound; a finding reproduces when all its claims "
        "do and does not when any claim does not. Gap recovery = (after − before) / "
        "(teacher − before) on the evaluation set where teacher and student differ most.", "",
        "| # | finding | study | verdict |", "|---|---|---|---|",
    ]
    for f in summary["findings"]:
        lines.append(f"| {f['number']} | [{f['title']}](#{f['number']}-{f['slug']}) | {f['study']} "
                     f"| **{f['verdict']}** |")
    for f in summary["findings"]:
        lines += ["", f"## {f['number']}. {f['slug']}", "", f"**{f['title']}.** Study: {f['study']}", "",
                  "| claim | quantity | per seed | mean [95% interval] | rule | verdict |",
                  "|---|---|---|---|---|---|"]
        for c in f["claims"]:
            lines.append(f"| {c['claim']} | {c['quantity']} | {_seeds_text(c['per_seed'])} | "
                         f"{_interval_text(c['value'])} | {c['rule']} | {c['verdict']} |")
        if f["context"]:
            lines += ["", "| also measured (not judged) | per seed | mean [95% interval] |", "|---|---|---|"]
            for label, v in f["context"].items():
                lines.append(f"| {label} | {_seeds_text(v['per_seed'])} | {_interval_text(v['value'])} |")
        if f["slug"] == "dynamics":
            lines += ["", "The overlap at each k and weighted by mass, before → after the run "
                      "(means over seeds; `opd diagnose`'s measurement on fresh rollouts):", "",
                      *_overlap_by_k_table(results)]
        lines += ["", f"![{f['slug']}]({f['slug']}.png)"]
    pairs = pairs_table(results)
    if pairs:
        lines += ["", "## The doctor, the outcome and the monitor", "",
                  "What `opd diagnose` said of each pair before its run, what the run did, and "
                  "what the live monitor raised during it (`rule@step`).", "", *pairs]
    seconds = summary["seconds"]
    lines += ["", "## Time", "",
              f"Zoo: {summary['zoo']['seconds']:.0f} s (0 when cached). This call: "
              f"{seconds['total_this_call']:.0f} s with {summary['workers']} worker(s), "
              f"{seconds['cached_jobs']} job(s) taken from an earlier call.", "",
              "| experiment | seconds per seed |", "|---|---|"]
    for name, times in seconds["experiments"].items():
        lines.append(f"| {name} | {', '.join(fmt(float(t), '.0f') for t in times)} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, summary: Mapping[str, Any], results: Results) -> None:
    """results.json, report.md and the findings' figures into `out`."""
    profile = ReproduceProfile(**summary["profile"])
    for f in summary["findings"]:
        save_figure(FIGURES[f["slug"]](results, profile), out / f"{f['slug']}.png", dpi=110)
    write_text_atomic(out / "results.json", json.dumps(summary, indent=1))
    write_text_atomic(out / "report.md", markdown(summary, results))
