"""`opd demo`, the embedded default: OPD on the model organisms, before and after.

It builds (or loads from the cache) the student and `teacher-aligned` of the zoo, measures
the student on its own evaluation set and on the withheld sub-skill (carry chains), runs OPD
from the teacher on the teacher's post-training prompts, measures again, and prints a
before/after table with the study's measures. The run folder holds metrics.jsonl, the run
report with its figures, and demo.md. Re-running continues (or re-reports) the same run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opd import metrics as M
from opd.config.training import build_config
from opd.data.prompts import PromptRecord
from opd.evaluation.accuracy import evaluate
from opd.io import check_output_folder, fmt, write_text_atomic
from opd.lab.zoo import PROFILES as ZOO_PROFILES
from opd.lab.zoo import build_zoo_stages, load_sets
from opd.models.loading import load_model, load_tokenizer
from opd.run.folder import CURVES_FIGURE, ENTROPY_FIGURE, RunFolder
from opd.run.hooks import run_hooks
from opd.run.loop import run_training

SHOWN = (M.OVERLAP_RATIO, M.OVERLAP_TOKEN_ADVANTAGE, M.ENTROPY_GAP, M.REVERSE_KL,
         M.STUDENT_ENTROPY, M.GRAD_NORM)
"""The measures the demo shows at the first and last step."""
TIMES = (M.TIME_ROLLOUT, M.TIME_SCORE, M.TIME_UPDATE, M.TIME_EVAL)


@dataclass(frozen=True)
class DemoProfile:
    """How big a demo: which zoo, how many OPD steps, how often to evaluate."""

    zoo: str
    steps: int
    eval_every: int


DEMO_PROFILES = {
    "full": DemoProfile(zoo="full", steps=150, eval_every=25),
    "quick": DemoProfile(zoo="quick", steps=40, eval_every=20),
    "choice": DemoProfile(zoo="choice", steps=40, eval_every=20),
}
OVERLAP_WINDOW = 5
"""Steps averaged at each end of the run when the demo says how far the overlap moved."""
WORLD_NOTES = {
    "addition": "In this world nearly every step has one right token: the student's top-1 learns "
                "the skill, the ranks below it hold near-zero probabilities that OPD never "
                "orders, so the top-k overlap the study tracks has little room to rise "
                "(docs/results.md). `opd demo --choice` runs OPD in a world with genuine choice "
                "of words and order, where it can.",
    "choice": "In this world most steps offer several words and the teacher favours other ones "
              "than the student, so the top-k overlap starts well below 1 and OPD raises it, as "
              "the study reports for pretrained pairs; but the student first takes up the "
              "teacher's wording, not its skill (docs/results.md, the world with choice).",
}
"""Why the overlap moves as it does, for the demo's world."""


def _accuracy(path: str, records: list[PromptRecord], tokens: int) -> float:
    tokenizer = load_tokenizer(path, "model")
    model = load_model(path, "model", trainable=False)
    return evaluate(model, tokenizer, records, max_new_tokens=tokens).accuracy


def overlap_change(records: list[dict[str, Any]], window: int = OVERLAP_WINDOW) -> dict[str, float]:
    """The overlap ratio's mean over the first and over the last `window` steps, and the
    change between them (a window, not one step: a step's overlap is noisy)."""
    values = [r[M.OVERLAP_RATIO] for r in records if r.get(M.OVERLAP_RATIO) is not None]
    first = sum(values[:window]) / len(values[:window])
    last = sum(values[-window:]) / len(values[-window:])
    return {"first": first, "last": last, "change": last - first, "window": window}


def run_demo(out: str | Path, zoo_root: str | Path, profile: str = "full", seed: int = 0,
             progress: bool = True) -> dict[str, Any]:
    """Build what is needed into `zoo_root`, run OPD from teacher-aligned into `out`, return
    (and write) the results. Both folders are checked before the zoo is built (minutes)."""
    spec = DEMO_PROFILES[profile]
    root = Path(zoo_root)
    check_output_folder(out, "out")
    check_output_folder(root, "cache")
    build_zoo_stages(root, spec.zoo, progress=progress, only=["student", "teacher-aligned"])
    sets = load_sets(root)
    zoo = ZOO_PROFILES[spec.zoo]
    digits = max(zoo.digits)
    tokens = zoo.world.max_new_tokens(digits)
    own, subskill = f"eval-nochain-d{digits}", f"eval-chain-d{digits}"
    student, teacher = str(root / "student"), str(root / "teacher-aligned")
    out = Path(out)
    config = build_config({
        "student": student, "teacher": teacher,
        "prompts": str(root / "data" / "teacher-train.jsonl"), "out": str(out),
        "max_steps": spec.steps, "max_new_tokens": tokens,
        "eval_prompts": str(root / "data" / f"{subskill}.jsonl"), "eval_every": spec.eval_every,
        "seed": seed, "progress": progress,
    }, profile="cpu-small")
    folder = RunFolder(out)
    run_training(config, resume=folder.metrics.exists(), hooks=run_hooks(config))
    trained = str(folder.complete_checkpoints()[-1])
    table = {
        name: {
            "prompts": len(sets[name]),
            "before": _accuracy(student, sets[name], tokens),
            "after": _accuracy(trained, sets[name], tokens),
            "teacher": _accuracy(teacher, sets[name], tokens),
        }
        for name in (subskill, own)
    }
    records = M.read(out)
    result = {
        "profile": profile, "seed": seed, "steps": spec.steps, "accuracy": table,
        "measures": {m: {"first": records[0].get(m), "last": records[-1].get(m)} for m in SHOWN},
        "overlap": {**overlap_change(records), "k": config.measure_k,
                    "world": zoo.world.name},
        "seconds": round(sum(r.get(key, 0.0) for r in records for key in TIMES), 1),
    }
    write_text_atomic(out / "demo.json", json.dumps(result, indent=2))
    write_text_atomic(out / "demo.md", demo_markdown(result))
    return result


def demo_markdown(result: dict[str, Any]) -> str:
    """The before/after table, the measures and the figures, as markdown."""
    lines = [f"# opd demo ({result['profile']}, seed {result['seed']}, {result['steps']} OPD steps)",
             "", "Greedy exact-match accuracy of the student, before and after OPD from "
             "teacher-aligned.", "",
             "| evaluation set | prompts | before | after | teacher |", "|---|---|---|---|---|"]
    for name, row in result["accuracy"].items():
        lines.append(f"| {name} | {row['prompts']} | {fmt(row['before'])} | {fmt(row['after'])} | "
                     f"{fmt(row['teacher'])} |")
    lines += ["", "| measure | first step | last step |", "|---|---|---|"]
    for name, row in result["measures"].items():
        first, last = row["first"], row["last"]
        lines.append(f"| {name} | {fmt(first, '.4g')} | {fmt(last, '.4g')} |")
    lines += ["", overlap_sentence(result["overlap"])]
    lines += ["", f"Training time: {result['seconds']} s.", "", f"![curves]({CURVES_FIGURE})", "",
              f"![student entropy by position]({ENTROPY_FIGURE})", ""]
    return "\n".join(lines)


def overlap_sentence(overlap: dict[str, Any]) -> str:
    """How far the overlap the study is about moved in the demo's run, and why, in words."""
    return (f"The overlap ratio (top-{overlap['k']}, mean of the first and of the last "
            f"{overlap['window']} steps) went {overlap['first']:.3f} → {overlap['last']:.3f} "
            f"({overlap['change']:+.3f}). {WORLD_NOTES[overlap['world']]}")


def print_demo(result: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"opd demo: OPD from teacher-aligned, {result['steps']} steps")
    for column in ("evaluation set", "prompts", "before", "after", "teacher"):
        table.add_column(column, justify="right" if column != "evaluation set" else "left")
    for name, row in result["accuracy"].items():
        table.add_row(name, str(row["prompts"]), fmt(row["before"]), fmt(row["after"]),
                      fmt(row["teacher"]))
    measures = Table(title="the study's measures on the student's rollouts")
    for column in ("measure", "first step", "last step"):
        measures.add_column(column)
    for name, row in result["measures"].items():
        measures.add_row(name, *(fmt(v, ".4g") for v in row.values()))
    console = Console()
    console.print(table)
    console.print(measures)
    console.print(overlap_sentence(result["overlap"]))
    console.print(f"run folder: {out} (metrics.jsonl, report.md, demo.md, curves.png)")
