"""The cold start's report: cold_start.json, and report.md with each stage's numbers side by
side (teacher data kept and covered, the fine-tuning's two curves and the step kept, the
gate's measurements, accuracy before SFT, after it and after OPD) and `sft_curves.png`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from opd.io import fmt, write_text_atomic
from opd.run.report import pyplot, save_figure

REPORT_FILE, FIGURE_FILE = "cold_start.json", "sft_curves.png"


def plot_sft_curves(sft: dict[str, Any], path: Path) -> Path:
    """Training loss per step and validation loss per measurement, the kept step marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(sft["train_losses"]) + 1), sft["train_losses"], lw=0.8, label="train")
    if sft["validation_losses"]:
        steps, losses = zip(*sft["validation_losses"], strict=True)
        ax.plot(steps, losses, marker="o", ms=3, label="validation")
    ax.axvline(sft["best_step"], color="grey", ls="--", lw=0.8, label=f"kept: step {sft['best_step']}")
    ax.set(xlabel="step", ylabel="loss per response token", yscale="log", title="cold-start SFT")
    ax.legend()
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def markdown(report: dict[str, Any]) -> str:
    """report.md: one table per stage, in the order they ran."""
    lines = ["# Off-policy cold start", ""]
    if report.get("stopped"):
        lines += [f"**Stopped before OPD.** {report['stopped']}", ""]
    data = report.get("teacher_data")
    if data:
        lines += ["## Teacher data", "", "| prompts | covered | responses kept | seconds |",
                  "|---|---|---|---|",
                  f"| {data['prompts']} | {data['prompts_covered']} | {data['responses_kept']} | "
                  f"{fmt(data['seconds'], '.1f')} |", ""]
    sft = report.get("sft")
    if sft:
        lines += ["## SFT", "", f"![curves]({FIGURE_FILE})", "",
                  "| train / validation prompts | cap | steps run | kept step | stopped early | "
                  "first → last train loss | best validation loss |", "|---|---|---|---|---|---|---|",
                  f"| {sft['prompts']} / {sft['validation_prompts']} | {sft['cap']} | {sft['steps']} | "
                  f"{sft['best_step']} | {fmt(sft['stopped_early'])} | {fmt(sft['first_loss'])} → "
                  f"{fmt(sft['last_loss'])} | {fmt(sft['best_validation_loss'])} |", ""]
    gate = report.get("gate")
    if gate:
        pattern, accuracy = gate["pattern"], gate["accuracy"] or {}
        lines += ["## Gate before OPD", "",
                  f"On {gate['prompts']} held-out prompts ({gate['rollouts_per_prompt']} rollouts "
                  "of the fine-tuned student each), measured as `opd diagnose` does.", "",
                  "| check | value | threshold | passed |", "|---|---|---|---|",
                  f"| overlap share | {fmt(pattern['value'])} | ≥ {fmt(pattern['threshold'])} | "
                  f"{fmt(pattern['passed'])} |"]
        lines.append("")
        if accuracy:
            lines += ["| held-out accuracy (greedy) | student before SFT | after SFT | after OPD | "
                      "teacher |", "|---|---|---|---|---|",
                      f"| {gate['prompts']} prompts | {fmt(accuracy['student_before'])} | "
                      f"{fmt(accuracy['student_after_sft'])} | "
                      f"{fmt(accuracy.get('student_after_opd'))} | {fmt(accuracy['teacher'])} |", ""]
    opd = report.get("opd")
    if opd:
        lines += ["## OPD", "", "| steps | accuracy at start → end (eval_prompts) | alerts |",
                  "|---|---|---|",
                  f"| {opd['steps']} | {fmt(opd.get('initial_accuracy'))} → "
                  f"{fmt(opd.get('final_accuracy'))} | "
                  f"{', '.join(a['rule'] for a in opd.get('alerts', [])) or 'none'} |", ""]
    if report.get("warnings"):
        lines += ["## Warnings", "", *[f"- {w}" for w in report["warnings"]], ""]
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any]) -> None:
    """cold_start.json, report.md and (after a fine-tuning) the SFT curves, in `out`."""
    if report.get("sft"):
        plot_sft_curves(report["sft"], out / FIGURE_FILE)
    write_text_atomic(out / "report.md", markdown(report))
    write_text_atomic(out / REPORT_FILE, json.dumps(report, indent=2))
