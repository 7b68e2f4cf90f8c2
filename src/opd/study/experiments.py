"""The experiments behind the study's findings, run on the zoo: OPD runs, diagnoses, a cold
start and a prompt selection, each once per seed.

Each (experiment, seed) is a job that writes `DIR/experiments/<name>/seed<k>/result.json` when
it is complete (and nothing under that name before), so an interrupted reproduce re-runs only
what had not finished. Jobs run in worker processes, one torch thread each. What a job returns
is plain JSON: the numbers the findings are judged on, and the curves their figures show.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from opd import metrics as M
from opd.errors import OPDError
from opd.io import write_text_atomic

RESULT = "result.json"
PROBE_K = (1, 2, 4, 8, 16)
"""Top-k sizes at which the overlap is measured before and after a run (finding 3)."""
SERIES = (M.OVERLAP_RATIO, M.OVERLAP_TOKEN_ADVANTAGE, M.ENTROPY_GAP, M.OVERLAP_MASS_STUDENT,
          M.OVERLAP_MASS_TEACHER, M.STUDENT_ENTROPY, M.TEACHER_ENTROPY, M.GRAD_NORM,
          M.TRAIN_REWARD, M.TRUNCATION_RATE, M.RESPONSE_LENGTH)
"""The per-step metrics a run's result keeps."""


@dataclass(frozen=True)
class ReproduceProfile:
    """How large the reproduction is: the zoo it runs on and the length of each experiment."""

    name: str
    zoo: str
    opd_steps: int
    window: int
    """Steps averaged at each end of a run when a measure's change is judged."""
    diagnose_prompts: int
    sft_steps: int
    """Cap of the cold start's fine-tuning (it stops earlier when the validation loss does)."""
    select_candidates: int
    trial_steps: int


PROFILES: dict[str, ReproduceProfile] = {
    "quick": ReproduceProfile("quick", zoo="quick", opd_steps=40, window=5, diagnose_prompts=32,
                              sft_steps=300, select_candidates=128, trial_steps=10),
    "choice": ReproduceProfile("choice", zoo="choice", opd_steps=40, window=5,
                               diagnose_prompts=32, sft_steps=300, select_candidates=128,
                               trial_steps=10),
    "full": ReproduceProfile("full", zoo="full", opd_steps=100, window=10, diagnose_prompts=64,
                             sft_steps=1000, select_candidates=256, trial_steps=20),
}


@dataclass(frozen=True)
class OPDRun:
    """OPD (the `cpu-small` profile) of a zoo student from a zoo teacher on `teacher-train`;
    `objective` overrides the objective's settings. With `probe`, the overlap of the trained
    student is measured at every k of PROBE_K as `opd diagnose` measures it."""

    student: str
    teacher: str
    objective: Mapping[str, Any] = field(default_factory=dict)
    probe: bool = False
    leader: str = "teacher"
    """Who leads on the evaluation set the run is judged on (`eval_set`): the teacher, whose
    lead the run should recover, or the student, whose lead it may lose."""


@dataclass(frozen=True)
class DiagnoseRun:
    """`opd diagnose` of a zoo student against a teacher, the overlap at every k of PROBE_K."""

    teacher: str
    student: str = "student"


@dataclass(frozen=True)
class ColdStart:
    """`opd cold-start` of the zoo student from a teacher: teacher data, SFT, gate (measured,
    not obeyed), then the same OPD as an OPDRun."""

    teacher: str


@dataclass(frozen=True)
class PromptSelection:
    """`opd select-prompts` of `teacher-train` for the student and a teacher, with its trials."""

    teacher: str


Spec = OPDRun | DiagnoseRun | ColdStart | PromptSelection

EXPERIMENTS: dict[str, Spec] = {
    "opd-aligned": OPDRun("student", "teacher-aligned", probe=True),
    "opd-foreign": OPDRun("student", "teacher-foreign", probe=True),
    "opd-same-pipeline": OPDRun("student", "teacher-same-pipeline"),
    "opd-reverse": OPDRun("student-rl", "student-prerl", leader="student"),
    "opd-overlap-only": OPDRun("student", "teacher-aligned", {"strategy": "intersection"}),
    "opd-non-overlap-only": OPDRun("student", "teacher-aligned",
                                   {"strategy": "symmetric-difference"}),
    "opd-sampled": OPDRun("student", "teacher-aligned", {"name": "sampled"}),
    **{f"opd-top{k}": OPDRun("student", "teacher-aligned", {"k": k}) for k in (1, 4, 16, 64)},
    **{f"opd-{pair}-{control}": OPDRun("student", f"teacher-{pair}", {"control": control})
       for pair in ("aligned", "foreign") for control in ("constant", "shuffled")},
    "diagnose-aligned": DiagnoseRun("teacher-aligned"),
    "diagnose-foreign": DiagnoseRun("teacher-foreign"),
    # The other pairs of the zoo, diagnosed and run: the rows of the forecast (bench/forecast.py).
    "opd-template2": OPDRun("student", "teacher-aligned-template2"),
    "diagnose-same-pipeline": DiagnoseRun("teacher-same-pipeline"),
    "diagnose-template2": DiagnoseRun("teacher-aligned-template2"),
    "diagnose-reverse": DiagnoseRun("student-prerl", student="student-rl"),
    "cold-start-foreign": ColdStart("teacher-foreign"),
    "select-prompts-template2": PromptSelection("teacher-aligned-template2"),
}


def zoo_models(names: Sequence[str]) -> list[str]:
    """The zoo models the experiments `names` need."""
    needed: dict[str, None] = {}
    for name in names:
        spec = EXPERIMENTS[name]
        needed.update(dict.fromkeys([getattr(spec, "student", "student"), spec.teacher]))
    return list(needed)


@dataclass(frozen=True)
class JobContext:
    """What a job needs besides its name and seed (picklable, for the worker processes)."""

    zoo: dict[str, Any]
    """zoo.json of the built zoo, with `root` added."""
    profile: ReproduceProfile
    out: str


# -- the jobs ---------------------------------------------------------------------------------
def _path(ctx: JobContext, model: str) -> str:
    return str(Path(ctx.zoo["root"]) / ctx.zoo["models"][model]["folder"])


def _set(ctx: JobContext, name: str) -> str:
    return str(Path(ctx.zoo["root"]) / ctx.zoo["sets"][name]["path"])


def _tokens(ctx: JobContext) -> int:
    from opd.lab.zoo import PROFILES as ZOO_PROFILES

    spec = ZOO_PROFILES[ctx.zoo["profile"]]
    return spec.world.max_new_tokens(max(spec.digits))


def eval_set(zoo: Mapping[str, Any], student: str, teacher: str, leader: str = "teacher") -> str:
    """The evaluation set on which a run is judged: the hardest (longest) set of the group
    where `leader` (teacher or student) leads the other most at the start, by the zoo's
    accuracies."""
    models = zoo["models"]
    sign = 1 if leader == "teacher" else -1
    group = max(zoo["eval_groups"], key=lambda g: sign * (models[teacher]["accuracy"][g]
                                                          - models[student]["accuracy"][g]))
    return zoo["eval_groups"][group][-1]


def _accuracy(path: str, records_file: str, tokens: int) -> float:
    from opd.data.prompts import load_prompts
    from opd.evaluation.accuracy import evaluate
    from opd.models.loading import load_model, load_tokenizer

    model = load_model(path, "model", trainable=False)
    return evaluate(model, load_tokenizer(path, "model"), load_prompts(records_file),
                    max_new_tokens=tokens).accuracy


def _train_config(ctx: JobContext, spec: OPDRun | ColdStart, seed: int, out: Path):
    from opd.config.training import build_config

    steps = ctx.profile.opd_steps
    return build_config({
        "student": _path(ctx, getattr(spec, "student", "student")),
        "teacher": _path(ctx, spec.teacher), "prompts": _set(ctx, "teacher-train"),
        "out": str(out), "max_steps": steps, "max_new_tokens": _tokens(ctx), "seed": seed,
        "progress": False, "eval_every": 0, "save_every": steps, "keep_checkpoints": 1,
        "objective": dict(getattr(spec, "objective", {})),
        "cold_start": {"sft_steps": ctx.profile.sft_steps},
    }, profile="cpu-small")


def _series(run: Path) -> dict[str, list[float | None]]:
    records = M.read(run)
    return {name: [r.get(name) for r in records] for name in SERIES}


def _judged(ctx: JobContext, student: str, teacher: str, trained: str,
            leader: str = "teacher") -> dict[str, Any]:
    """Accuracy of the trained student on the run's evaluation set, beside the zoo's
    accuracies of the starting student and the teacher there, and the share of the gap."""
    name = eval_set(ctx.zoo, student, teacher, leader)
    before = ctx.zoo["models"][student]["accuracy"][name]
    teacher_acc = ctx.zoo["models"][teacher]["accuracy"][name]
    after = _accuracy(trained, _set(ctx, name), _tokens(ctx))
    gap = teacher_acc - before
    return {"eval_set": name, "before": before, "teacher": teacher_acc, "after": after,
            "gap_recovery": (after - before) / gap if gap else None}


def _overlap_by_k(ctx: JobContext, student_path: str, teacher: str, seed: int) -> dict[str, Any]:
    """`opd diagnose` of a student folder against a zoo teacher on `teacher-train`: the overlap
    measures at every k of PROBE_K, the continuation curve and the sequence reward's AUROC."""
    from opd.config.settings import build
    from opd.doctor.measure import DiagnoseConfig, run_diagnosis

    config = build(DiagnoseConfig, {
        "student": student_path, "teacher": _path(ctx, teacher), "prompts": _set(ctx, "teacher-train"),
        "num_prompts": ctx.profile.diagnose_prompts, "max_new_tokens": _tokens(ctx),
        "k": PROBE_K, "seed": seed, "progress": False})
    found = run_diagnosis(config, writes=False)["teacher"]
    keys = (M.OVERLAP_RATIO, M.OVERLAP_MASS_STUDENT, M.OVERLAP_MASS_TEACHER,
            "overlap_share_student", "overlap_share_teacher", M.OVERLAP_TOKEN_ADVANTAGE)
    by_k = {k: {key: v["overall"][key] for key in keys} for k, v in found["pattern"]["by_k"].items()}
    curve = [{"depth": p["depth"], "tokens": p["tokens"], "advantage": p["advantage"]["mean"],
              "teacher_accuracy": p["teacher_accuracy"], "student_accuracy": p["student_accuracy"]}
             for p in found["continuation"] or []]
    signal = found["global_signal"] or {}
    checks = {name: check["value"] for name, check in found["decision"]["checks"].items()}
    return {"by_k": by_k, "continuation": curve, "auroc": signal.get("auroc"),
            "verdict": found["decision"]["verdict"], "checks": checks}


def fired_alerts(summary: Mapping[str, Any]) -> list[str]:
    """The live monitor's alerts of a run (its summary), as `rule@step`."""
    return [f"{a['rule']}@{a['step']}" for a in summary.get("alerts", [])]


def _opd_run(ctx: JobContext, spec: OPDRun, seed: int, folder: Path) -> dict[str, Any]:
    from opd.run.folder import RunFolder
    from opd.run.loop import run_training

    run = folder / "run"
    summary = run_training(_train_config(ctx, spec, seed, run))
    trained = str(RunFolder(run).complete_checkpoints()[-1])
    out = {**_judged(ctx, spec.student, spec.teacher, trained, spec.leader),
           "alerts": fired_alerts(summary), "series": _series(run)}
    if spec.probe:
        out["probe_after"] = _overlap_by_k(ctx, trained, spec.teacher, seed)
    return out


def _diagnosis(ctx: JobContext, spec: DiagnoseRun, seed: int, folder: Path) -> dict[str, Any]:
    return _overlap_by_k(ctx, _path(ctx, spec.student), spec.teacher, seed)


def _cold_start(ctx: JobContext, spec: ColdStart, seed: int, folder: Path) -> dict[str, Any]:
    from opd.recipes.cold_start import run_cold_start

    run = folder / "run"
    report = run_cold_start(_train_config(ctx, spec, seed, run), force=True)
    sft = _judged(ctx, "student", spec.teacher, str(run / "sft"))
    final = _judged(ctx, "student", spec.teacher, report["opd"]["final_checkpoint"])
    return {**final, "after_sft": sft["after"], "gate_passed": report["gate"]["passed"],
            "alerts": fired_alerts(report["opd"]),
            "sft_steps": report["sft"].get("steps"), "series": _series(run / "opd")}


def _prompt_selection(ctx: JobContext, spec: PromptSelection, seed: int, folder: Path) -> dict[str, Any]:
    from opd.config.settings import build
    from opd.recipes.select_prompts import SelectConfig, run_select_prompts

    config = build(SelectConfig, {
        "student": _path(ctx, "student"), "teacher": _path(ctx, spec.teacher),
        "prompts": _set(ctx, "teacher-train"), "out": str(folder / "run"),
        "num_prompts": ctx.profile.select_candidates, "max_new_tokens": _tokens(ctx),
        "trial_steps": ctx.profile.trial_steps, "trial_profile": "cpu-small", "seed": seed,
        "progress": False})
    selection = run_select_prompts(config)
    step0, trial = selection["step0"], selection["trial"]
    fresh = step0["fresh_rollouts"]
    return {
        "step0_overlap": {
            "student_template": step0["student_template"][M.OVERLAP_RATIO],
            "teacher_template": step0["teacher_template"][M.OVERLAP_RATIO],
            "all_candidates": fresh["all_candidates"][M.OVERLAP_RATIO],
            "selected": fresh["selected"][M.OVERLAP_RATIO]},
        "entropy_change": {name: trial[name]["change"] for name in ("kept_only", "selected", "unselected")},
        "entropy": {name: trial[name][M.STUDENT_ENTROPY] for name in ("kept_only", "selected", "unselected")},
    }


RUNNERS: dict[type, Callable[[JobContext, Any, int, Path], dict[str, Any]]] = {
    OPDRun: _opd_run, DiagnoseRun: _diagnosis, ColdStart: _cold_start,
    PromptSelection: _prompt_selection,
}


def job_folder(out: str | Path, name: str, seed: int) -> Path:
    return Path(out) / "experiments" / name / f"seed{seed}"


def read_result(out: str | Path, name: str, seed: int) -> dict[str, Any] | None:
    """A finished job's result, or None."""
    path = job_folder(out, name, seed) / RESULT
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def run_job(ctx: JobContext, name: str, seed: int) -> dict[str, Any]:
    """Run one experiment for one seed from scratch (whatever an unfinished attempt left is
    removed first) and write its result; returns it."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # the reproduction's own bar says what is happening
    folder = job_folder(ctx.out, name, seed)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    spec = EXPERIMENTS[name]
    start = time.perf_counter()
    result = RUNNERS[type(spec)](ctx, spec, seed, folder)
    result = {"experiment": name, "seed": seed, "spec": {"kind": type(spec).__name__, **asdict(spec)},
              "seconds": round(time.perf_counter() - start, 1), **result}
    write_text_atomic(folder / RESULT, json.dumps(result, indent=1))
    return result


def run_jobs(ctx: JobContext, jobs: Sequence[tuple[str, int]], workers: int) -> Iterator[dict[str, Any]]:
    """Run the jobs in `workers` processes (in this one with 1), yielding each result as it
    finishes. A job that fails stops the reproduction with its name and seed."""
    if workers <= 1:
        for name, seed in jobs:
            yield run_job(ctx, name, seed)
        return
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by the workers as they start
    try:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_job, ctx, name, seed): (name, seed) for name, seed in jobs}
            for future in as_completed(futures):
                name, seed = futures[future]
                try:
                    yield future.result()
                except OPDError as err:
                    for other in futures:
                        other.cancel()
                    raise OPDError(f"reproduce: experiment {name} (seed {seed}) failed: {err}") from err
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
