"""Files and the terminal table of a diagnosis, all made from diagnosis.json after measuring.

`write_outputs` writes diagnosis.json, report.md and three PNG figures (overlap by position,
continuation advantage by depth, sequence-reward distributions) into the out folder, each to a
temporary name first and renamed into place, so a reader never sees a half-written file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from opd.config.choices import CONTROL_NONE
from opd.io import fmt, write_text_atomic
from opd.run.report import save_figure

FIGURES = ("overlap_by_position.png", "continuation_by_depth.png", "reward_distributions.png")


def _teachers(diagnosis: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = [("teacher", diagnosis["teacher"])]
    if diagnosis.get("teacher2"):
        out.append(("teacher2", diagnosis["teacher2"]))
    return out


def evidence_rows(diagnosis: dict[str, Any]) -> list[tuple[str, ...]]:
    """(check, measured, threshold, margin, passed) per teacher and check."""
    rows = []
    for name, result in _teachers(diagnosis):
        rows.append((f"{name}: verdict", result["decision"]["verdict"], "", "", ""))
        for check, entry in result["decision"]["checks"].items():
            rows.append((f"  {check}", fmt(entry["value"]), fmt(entry["threshold"]),
                         fmt(entry["margin"]), fmt(entry["passed"])))
    return rows


def measure_rows(diagnosis: dict[str, Any]) -> list[tuple[str, ...]]:
    """The headline numbers per teacher: step-0 measures for each k, accuracies, AUROC."""
    student = diagnosis["student"]
    rows = [(f"student accuracy (rollouts, T={diagnosis['inputs']['temperature']:g})",
             fmt(student["accuracy"])),
            ("student unsolved prompts", f"{fmt(student['unsolved_prompts'])} of {student['prompts']}"),
            ("mean response length", fmt(student["mean_response_length"], ".1f"))]
    for name, result in _teachers(diagnosis):
        for k, block in result["pattern"]["by_k"].items():
            o = block["overall"]
            rows.append((f"{name} top-{k} overlap ratio; mass s,t; share s,t",
                         f"{fmt(o['overlap_ratio'])}; {fmt(o['overlap_mass_student'])}, "
                         f"{fmt(o['overlap_mass_teacher'])}; {fmt(o['overlap_share_student'])}, "
                         f"{fmt(o['overlap_share_teacher'])}"))
        k = str(diagnosis["thresholds"]["pattern_k"])
        o = result["pattern"]["by_k"][k]["overall"]
        topk = result.get("entropy") == "topk"
        estimate = " (top-k estimate of the served teacher's entropy)" if topk else ""
        rows += [(f"{name} overlap-token advantage (top-{k})", fmt(o["overlap_token_advantage"])),
                 (f"{name} entropy gap{estimate} / reverse KL",
                  f"{fmt(o['entropy_gap'])} / {fmt(o['reverse_kl'])}")]
        template = result["template"]
        rows.append((f"{name} template gap (nats/token)",
                     "same rendering" if template["identical"]
                     else template["note"] if template["gap"] is None
                     else f"{fmt(template['gap'])} ± {fmt(template['se'])}"))
        if result.get("continuation"):
            greedy = diagnosis["inputs"]["capability_temperature"]
            rows.append((f"{name} accuracy, own template (T={greedy:g})",
                         fmt(result.get("accuracy_own_template"))))
            for point in result["continuation"]:
                adv, hard = point["advantage"], point["advantage_unsolved"]
                rows.append((f"{name} depth {point['depth']:g} (≈{fmt(point['tokens'])} tok) T/S acc, adv, "
                             "adv unsolved",
                             f"{fmt(point['teacher_accuracy'])}/{fmt(point['student_accuracy'])}, "
                             f"{fmt(adv['mean'])}±{fmt(adv['se'])}, "
                             f"{fmt(hard['mean'])}±{fmt(hard['se'])}"))
            rows.append((f"{name} recommended max length", fmt(result.get("recommended_max_new_tokens"))))
            rows.append((f"{name} AUROC of sequence reward", fmt(result["global_signal"]["auroc"])))
        if "versus_teacher" in result:
            versus = result["versus_teacher"]
            rows.append(("teacher vs teacher2 distinguishable",
                         f"{fmt(versus['distinguishable'])} "
                         f"(overlap share {fmt(versus['overlap_share'])})"))
    return rows


def control_rows(diagnosis: dict[str, Any]) -> list[tuple[str, ...]]:
    """Does the teacher matter (`--control`): accuracy after each short run, its gain, and the
    share of the teacher's gain each control does not reproduce; none without `--control`."""
    control = diagnosis.get("control")
    if not control:
        return []
    rows = [(f"accuracy before ({control['prompts']} prompts, greedy)",
             fmt(control["accuracy_before"]), "", "")]
    for signal, after in control["accuracy_after"].items():
        label = "teacher" if signal == CONTROL_NONE else f"{signal} control"
        rows.append((f"after {control['steps']} steps, {label}", fmt(after),
                     fmt(control["gain"][signal]), fmt(control["teacher_share"].get(signal))))
    return rows


def forecast_line(forecast: dict[str, Any]) -> str:
    """The forecast in one line: expected gap recovery, 80% interval and what drove it, or
    why there is none."""
    if not forecast["shown"]:
        return f"no forecast: {forecast['reason']}"
    fitted = forecast["fitted_on"]
    text = (f"expected gap recovery {forecast['expected']:.2f} [{forecast['low']:.2f}, "
            f"{forecast['high']:.2f}] (80%), from {forecast['measurement']} = "
            f"{forecast['value']:.3f}; fitted on {forecast['rows']} runs of "
            f"{len(forecast['pairs'])} pairs ({', '.join(fitted.get('worlds', []))}, "
            f"{fitted.get('steps')} steps), held out: error {forecast['held_out_mae']:.3f} vs "
            f"{forecast['mean_baseline_mae']:.3f} for the mean, "
            f"{100 * forecast['held_out_coverage']:.0f}% inside the interval")
    return "; ".join([text, *forecast["notes"]])


def ranking_rows(diagnoses: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    """Teachers ranked by their forecast's expected gap recovery, interval beside (those
    without a forecast last, in name order, with the reason)."""
    def key(item: tuple[str, dict[str, Any]]) -> tuple[bool, float, str]:
        forecast = item[1]["forecast"]
        return (not forecast["shown"], -forecast.get("expected", 0.0), item[0])

    rows = []
    for name, diagnosis in sorted(diagnoses.items(), key=key):
        forecast = diagnosis["forecast"]
        if forecast["shown"]:
            rows.append((name, diagnosis["verdict"], f"{forecast['expected']:.2f}",
                         f"[{forecast['low']:.2f}, {forecast['high']:.2f}]"))
        else:
            rows.append((name, diagnosis["verdict"], "–", forecast["reason"]))
    return rows


RANKING_HEADER = ("teacher", "verdict", "forecast gap recovery", "80% interval")
CONTROL_HEADER = ("run", "accuracy", "gain", "share of the teacher's gain that needs the teacher")


def cost_line(diagnosis: dict[str, Any]) -> str:
    cost = diagnosis["cost"]
    run = cost["training_run"]
    return (f"cost: {cost['student_rollouts']} student rollouts, {cost['teacher_rollouts']} teacher "
            f"rollouts, {cost['continuations']} continuations, {cost['generated_tokens']} generated and "
            f"{cost['scored_tokens']} scored tokens, {cost['wall_seconds']:.1f} s; ≈ "
            f"{cost['percent_of_training_run']:.2f}% of a {run['steps']}-step run of "
            f"{run['rollouts_per_step']} rollouts per step")


def print_table(diagnosis: dict[str, Any]) -> None:
    """The verdict, the evidence and the cost, as rich tables in the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    evidence = Table(title=f"opd diagnose: verdict [bold]{diagnosis['verdict']}[/bold]")
    for column in ("check", "measured", "threshold", "margin", "passed"):
        evidence.add_column(column)
    for row in evidence_rows(diagnosis):
        evidence.add_row(*row)
    console.print(evidence)
    measures = Table(title="measures on the student's rollouts")
    measures.add_column("measure")
    measures.add_column("value")
    for row in measure_rows(diagnosis):
        measures.add_row(*row)
    console.print(measures)
    if control_rows(diagnosis):
        control = Table(title="does the teacher matter? (--control)")
        for column in CONTROL_HEADER:
            control.add_column(column)
        for row in control_rows(diagnosis):
            control.add_row(*row)
        console.print(control)
    for line in diagnosis["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {line}")
    for line in diagnosis["teacher"]["decision"]["advice"]:
        console.print(f"[green]advice:[/green] {line}")
    console.print(f"forecast: {forecast_line(diagnosis['forecast'])}")
    console.print(cost_line(diagnosis))


def print_ranking(diagnoses: dict[str, dict[str, Any]]) -> None:
    """Several teachers' diagnoses, ranked by forecast (`opd diagnose --set teachers=…`)."""
    from rich.console import Console
    from rich.table import Table

    ranking = Table(title="teachers ranked by forecast")
    for column in RANKING_HEADER:
        ranking.add_column(column)
    for row in ranking_rows(diagnoses):
        ranking.add_row(*row)
    Console().print(ranking)


def _markdown(diagnosis: dict[str, Any]) -> str:
    def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return lines + ["| " + " | ".join(cell.strip() or " " for cell in row) + " |" for row in rows]

    inputs = diagnosis["inputs"]
    lines = [
        f"# OPD diagnosis: `{diagnosis['verdict']}`", "",
        f"Student `{inputs['student']}`, teacher `{inputs['teacher']}`"
        + (f", second teacher `{inputs['teacher2']}`" if inputs.get("teacher2") else "")
        + f"; {diagnosis['student']['prompts']} prompts from `{inputs['prompts']}`, "
        f"{inputs['samples_per_prompt']} rollouts each at temperature {inputs['temperature']}.", "",
        "## Evidence and thresholds", "",
        *table(("check", "measured", "threshold", "margin", "passed"), evidence_rows(diagnosis)), "",
        "## Measures", "", *table(("measure", "value"), measure_rows(diagnosis)), "",
    ]
    across = diagnosis["teacher"].get("across_tokenizers")
    if across:
        lines += ["## Across tokenizers", "",
                  f"The teacher has another tokenizer: {fmt(across['aligned_share'])} of the "
                  f"student's tokens align one to one, on a shared vocabulary of "
                  f"{across['shared_vocabulary']} of the student's {across['student_vocabulary']} "
                  "tokens.", "",
                  *table(("part", "exact or approximate"), list(across["measures"].items())), ""]
    lines += ["## Forecast", "", forecast_line(diagnosis["forecast"]), ""]
    if control_rows(diagnosis):
        lines += ["## Does the teacher matter?", "",
                  "The same short OPD run with the teacher's signal and with controls that carry "
                  "no teacher information (docs/diagnose.md#does-the-teacher-matter):", "",
                  *table(CONTROL_HEADER, control_rows(diagnosis)), ""]
    if diagnosis["warnings"]:
        lines += ["## Warnings", "", *[f"- {w}" for w in diagnosis["warnings"]], ""]
    advice = diagnosis["teacher"]["decision"]["advice"]
    if advice:
        lines += ["## What to do", "", *[f"- {a}" for a in advice], ""]
    lines += ["## Thresholds used", "",
              *[f"- `{k}` = {v}" for k, v in diagnosis["thresholds"].items()], "",
              "## Figures", "", *[f"![{name}]({name})" for name in FIGURES], "",
              "## Cost", "", cost_line(diagnosis), ""]
    return "\n".join(lines)


def _figures(diagnosis: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = str(diagnosis["thresholds"]["pattern_k"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, result in _teachers(diagnosis):
        pattern = result["pattern"]
        block = pattern["by_k"][k]["by_position"]
        edges = pattern["bin_edges"]
        axes[0].plot(edges, block["overlap_ratio"], marker="o", label=f"{name} overlap ratio")
        axes[1].plot(edges, block["overlap_share_student"], marker="o", label=f"{name} share (student)")
        axes[1].plot(edges, block["overlap_share_teacher"], marker="s", ls="--",
                     label=f"{name} share (teacher)")
    axes[1].axhline(diagnosis["thresholds"]["min_overlap_share"], color="grey", lw=0.8)
    for ax, title in zip(axes, (f"top-{k} overlap ratio", f"top-{k} overlap share"), strict=True):
        ax.set(xlabel="response position (bin start)", title=title, ylim=(0, 1.05))
        ax.legend(fontsize=7)
    _save(fig, out / FIGURES[0])

    fig, ax = plt.subplots(figsize=(6, 4))
    z = diagnosis["thresholds"]["z"]
    for name, result in _teachers(diagnosis):
        for key, style in (("advantage", "-o"), ("advantage_unsolved", "--s")):
            points = [p for p in result.get("continuation") or [] if p[key]["mean"] is not None]
            ax.errorbar([p["depth"] for p in points], [p[key]["mean"] for p in points],
                        yerr=[z * p[key]["se"] for p in points], fmt=style, capsize=3,
                        label=f"{name} {key.replace('_', ' ')}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="cut depth (share of response, or tokens)", ylabel="teacher − student accuracy",
           title=f"continuation advantage from student prefixes (±{z:g} SE)")
    ax.legend(fontsize=7)
    _save(fig, out / FIGURES[1])

    fig, ax = plt.subplots(figsize=(6, 4))
    correct = diagnosis["student"]["correct"]
    for name, result in _teachers(diagnosis):
        reward = result["sequence_reward"]
        if correct is None:
            ax.hist(reward, bins=30, alpha=0.5, label=f"{name}: all rollouts")
            continue
        for flag, label in ((True, "correct"), (False, "wrong")):
            ax.hist([r for r, c in zip(reward, correct, strict=True) if c == flag], bins=30,
                    alpha=0.5, label=f"{name}: {label}")
    ax.set(xlabel="sequence-mean reward (log q − log p per token)", ylabel="rollouts",
           title="global signal")
    ax.legend(fontsize=7)
    _save(fig, out / FIGURES[2])


def _save(fig: Any, path: Path) -> None:
    save_figure(fig, path, dpi=100, bbox_inches="tight")


def write_outputs(diagnosis: dict[str, Any], out: str | Path) -> Path:
    """diagnosis.json, report.md and the figures in `out`; returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "diagnosis.json", json.dumps(diagnosis, indent=2))
    _figures(diagnosis, out)
    write_text_atomic(out / "report.md", _markdown(diagnosis))
    return out
