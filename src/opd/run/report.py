"""Reports made from a run folder after (or beside) training, never inside the step:
PNG figures of the measures over steps, the position × step heat map of student entropy,
and a markdown summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from opd import metrics as M
from opd.errors import OPDError
from opd.io import check_output_folder, fmt, write_atomic, write_text_atomic
from opd.run.folder import CURVES_FIGURE, ENTROPY_FIGURE, RunFolder
from opd.runtime import StepHook, is_main_process

CURVES = (
    (M.ACCURACY, "evaluation accuracy"),
    (M.OVERLAP_RATIO, "overlap ratio (top-k)"),
    (M.OVERLAP_TOKEN_ADVANTAGE, "overlap-token advantage"),
    (M.ENTROPY_GAP, "entropy gap |H(q) − H(p)|"),
    (M.GRAD_NORM, "gradient norm"),
    (M.STUDENT_ENTROPY, "student entropy"),
)
TABLE = (M.LOSS, M.OVERLAP_RATIO, M.OVERLAP_TOKEN_ADVANTAGE, M.ENTROPY_GAP,
         M.OVERLAP_MASS_STUDENT, M.OVERLAP_MASS_TEACHER, M.STUDENT_ENTROPY, M.REVERSE_KL,
         M.GRAD_NORM, M.RESPONSE_LENGTH, M.TRUNCATION_RATE)
"""The measures of the run report's first/last-step table."""


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, **options: Any) -> Path:
    """Write a matplotlib figure atomically and close it."""
    plt = pyplot()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip("."), **options))
    plt.close(fig)
    return path


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r[M.STEP], r[key]) for r in records
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
            if key == M.ACCURACY and initial_accuracy and initial_accuracy.get(label) is not None:
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
    return save_figure(fig, path, dpi=110)


def entropy_heatmap(records: list[dict[str, Any]], path: Path, key: str = M.STUDENT_ENTROPY) -> Path:
    """Position bin × step heat map of a by-position measure (docs/method.md#measures)."""
    plt = pyplot()
    rows = [r for r in records if key in r.get(M.BY_POSITION, {})]
    grid = [[math.nan if v is None else v for v in r[M.BY_POSITION][key]] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    if grid:
        image = ax.imshow(list(map(list, zip(*grid, strict=True))), aspect="auto", origin="lower",
                          extent=(rows[0][M.STEP] - 0.5, rows[-1][M.STEP] + 0.5, -0.5,
                                  len(grid[0]) - 0.5), cmap="magma", interpolation="nearest")
        fig.colorbar(image, ax=ax, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("response position bin (0 = start)")
    ax.set_title(f"{key.replace('_', ' ')} by response position")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def _summary(run: Path) -> dict[str, Any]:
    path = RunFolder(run).summary
    if not path.exists():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        summary = None
    if not isinstance(summary, dict):
        raise OPDError(f"report: {path} is damaged (not a JSON object); delete it (the run "
                       "writes it again when it ends) or restore it")
    return summary


def check_run_folder(run_folder: str | Path) -> list[dict[str, Any]]:
    """The records of a run folder `opd report` can write into; OPDError naming what is wrong."""
    run = Path(run_folder)
    metrics = RunFolder(run).metrics
    if not run.is_dir():
        what = "is a file" if run.exists() else "does not exist"
        raise OPDError(f"report: {str(run)!r} {what}; give a run folder (the --out of a run)")
    if not metrics.exists():
        raise OPDError(f"report: {str(run)!r} is not a run folder (no {metrics.name} in it)")
    records = M.read(run)
    if not records:
        raise OPDError(f"report: {metrics} holds no steps yet; report once the run "
                       "has logged one")
    _summary(run)
    check_output_folder(run, "report", "run folder")
    return records


def check_compare_path(path: str | Path) -> None:
    """`--compare FILE`: a figure name in a folder that can be made and written."""
    path = Path(path)
    if path.is_dir():
        raise OPDError(f"--compare: {str(path)!r} is a folder; give a file name such as "
                       f"{path / 'compare.png'}")
    if path.suffix.lower() not in FIGURE_SUFFIXES:
        raise OPDError(f"--compare: {str(path)!r} must name a {'/'.join(FIGURE_SUFFIXES)} figure")
    check_output_folder(path.parent, "compare")


def write_run_report(run_folder: str | Path) -> Path:
    """report.md with curves.png and entropy_heatmap.png for one run folder."""
    run, folder = Path(run_folder), RunFolder(run_folder)
    records = M.read(run)
    summary = _summary(run)
    plot_curves({run.name: records}, folder.curves, {run.name: summary.get("initial_accuracy")})
    entropy_heatmap(records, folder.entropy_heatmap)
    first, last = (records[0], records[-1]) if records else ({}, {})
    lines = [f"# Run report: {run.name}", ""]
    if summary:
        lines += [f"- steps: {summary.get('steps')}",
                  f"- accuracy: {fmt(summary.get('initial_accuracy'), '.4g')} → "
                  f"{fmt(summary.get('final_accuracy'), '.4g')}",
                  f"- skipped steps (non-finite): {summary.get('skipped_steps')}", ""]
    lines += ["| measure | first step | last step |", "|---|---|---|"]
    lines += [f"| {k} | {fmt(first.get(k), '.4g')} | {fmt(last.get(k), '.4g')} |" for k in TABLE]
    lines += ["", f"![curves]({CURVES_FIGURE})", "", f"![student entropy]({ENTROPY_FIGURE})", ""]
    path = folder.report
    write_text_atomic(path, "\n".join(lines))
    return path


class ReportHook(StepHook):
    """Writes the run report when a training run ends (main process)."""

    def __init__(self, run_folder: str | Path) -> None:
        self.run_folder = run_folder

    def on_end(self, summary: dict[str, Any]) -> None:
        if is_main_process():
            write_run_report(self.run_folder)
