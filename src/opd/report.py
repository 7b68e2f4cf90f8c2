"""Reports made from a run folder after (or beside) training, never inside the step:
PNG figures of the measures over steps, the position × step heat map of student entropy,
and a markdown summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from opd.checkpoints import read_jsonl

CURVES = (
    ("accuracy", "evaluation accuracy"),
    ("overlap_ratio", "overlap ratio (top-k)"),
    ("overlap_token_advantage", "overlap-token advantage"),
    ("entropy_gap", "entropy gap |H(q) − H(p)|"),
    ("grad_norm", "gradient norm"),
    ("student_entropy", "student entropy"),
)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path,
                initial_accuracy: dict[str, float | None] | None = None) -> Path:
    """One panel per measure, one line per run (label → records)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, CURVES, strict=True):
        for label, records in runs.items():
            steps, values = _series(records, key)
            if key == "accuracy" and initial_accuracy and initial_accuracy.get(label) is not None:
                steps, values = [0, *steps], [initial_accuracy[label], *values]
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 15 else None, ms=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes.flat[1].get_legend_handles_labels()
    if len(runs) > 1 and handles:
        fig.legend(handles, labels, loc="upper center", ncol=len(runs), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95 if len(runs) > 1 else 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def entropy_heatmap(records: list[dict[str, Any]], path: Path, key: str = "student_entropy") -> Path:
    """Position bin × step heat map of a by-position measure (SPEC §3)."""
    plt = pyplot()
    rows = [r for r in records if key in r.get("by_position", {})]
    grid = [[math.nan if v is None else v for v in r["by_position"][key]] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    if grid:
        image = ax.imshow(list(map(list, zip(*grid, strict=True))), aspect="auto", origin="lower",
                          extent=(rows[0]["step"] - 0.5, rows[-1]["step"] + 0.5, -0.5,
                                  len(grid[0]) - 0.5), cmap="magma", interpolation="nearest")
        fig.colorbar(image, ax=ax, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("response position bin (0 = start)")
    ax.set_title(f"{key.replace('_', ' ')} by response position")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "–" if value is None else str(value)


def write_run_report(run_folder: str | Path) -> Path:
    """report.md with curves.png and entropy_heatmap.png for one run folder."""
    run = Path(run_folder)
    records = read_jsonl(run / "metrics.jsonl")
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    plot_curves({run.name: records}, run / "curves.png",
                {run.name: summary.get("initial_accuracy")})
    entropy_heatmap(records, run / "entropy_heatmap.png")
    keys = ["loss", "overlap_ratio", "overlap_token_advantage", "entropy_gap",
            "overlap_mass_student", "overlap_mass_teacher", "student_entropy", "reverse_kl",
            "grad_norm", "response_length", "truncation_rate"]
    first, last = (records[0], records[-1]) if records else ({}, {})
    lines = [f"# Run report: {run.name}", ""]
    if summary:
        lines += [f"- steps: {summary.get('steps')}",
                  f"- accuracy: {_fmt(summary.get('initial_accuracy'))} → "
                  f"{_fmt(summary.get('final_accuracy'))}",
                  f"- skipped steps (non-finite): {summary.get('skipped_steps')}", ""]
    lines += ["| measure | first step | last step |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(first.get(k))} | {_fmt(last.get(k))} |" for k in keys]
    lines += ["", "![curves](curves.png)", "", "![student entropy](entropy_heatmap.png)", ""]
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path
