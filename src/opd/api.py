"""The Python API: one function per verb, returning typed results. The `opd` command is a thin
layer over these functions, and `opd/__init__.py` re-exports what is public (`opd.__all__`);
nothing else is promised.

Every function takes its settings the way the command line does, as keywords named like the
settings (`max_steps=50`, `objective={"k": 8}` or `**{"objective.k": 8}`), a `config`
(the verb's config dataclass, a mapping of settings, or a YAML file), or both, keywords
winning; `opd train --help-config` lists them. Bad input raises `OPDError` with the same one
line the command prints.

    import opd

    diagnosis = opd.diagnose("student", "teacher", "prompts.jsonl")
    print(diagnosis.verdict, diagnosis.checks["pattern"].value)
    result = opd.train(student="student", teacher="teacher", prompts="prompts.jsonl",
                       out="runs/a", profile="cpu-small", max_steps=50)
    print(result.final_measures["overlap_ratio"], result.model)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd import metrics as M
from opd.config import settings as S
from opd.config.training import PROFILES, TrainConfig
from opd.doctor.measure import DiagnoseConfig
from opd.doctor.rules import Thresholds
from opd.errors import OPDError
from opd.evaluation.accuracy import EvalConfig, EvalResult
from opd.io import fmt
from opd.recipes.select_prompts import SelectConfig
from opd.run.folder import Resume
from opd.runtime import StepHook

ConfigLike = Any
"""A verb's config dataclass, a mapping of settings (nested or dotted keys), a YAML file path,
or None."""

RECORD_ONLY = {M.STEP, M.BY_POSITION, M.BY_TEACHER, M.ALERTS}


def _config(cls: type, config: ConfigLike, values: Mapping[str, Any], *,
            profile: str | None = None, defaults: Mapping[str, Any] | None = None,
            forced: Mapping[str, Any] | None = None) -> Any:
    """A validated `cls`: defaults < profile < `defaults` < `config` < `values` < `forced`
    (a None value sets nothing), its GGUF models converted to folders (`opd.models.gguf`)."""
    from opd.models.gguf import with_converted_models

    values = {k: str(v) if isinstance(v, Path) else v for k, v in values.items() if v is not None}
    if isinstance(config, cls) and not values and not forced:
        return with_converted_models(config)
    if isinstance(config, cls):
        base: dict[str, Any] = S.to_dict(config)
    elif isinstance(config, str | Path):
        base = S.load_yaml(config)
    elif isinstance(config, Mapping):
        base = dict(config)
    elif config is None:
        base = {}
    else:
        raise OPDError(f"config: expected a {cls.__name__}, a mapping of settings or a YAML "
                       f"file, got {type(config).__name__}")
    profile_layer: Mapping[str, Any] = {}
    if cls is TrainConfig and not isinstance(config, cls):
        name = profile or base.pop("profile", None) or next(iter(PROFILES))
        if name not in PROFILES:
            raise OPDError(f"profile: unknown value {name!r}; choose one of {sorted(PROFILES)}")
        profile_layer = PROFILES[name]
    elif profile is not None and cls is not TrainConfig:
        raise OPDError(f"profile: {cls.__name__} has no profiles")
    return with_converted_models(S.build(cls, profile_layer, defaults or {}, base, values,
                                         forced or {}))


# -- training ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainResult:
    """A finished (or stopped) training run."""

    run: Path
    """The run folder: metrics.jsonl, summary.json, report.md, checkpoints/, model/."""
    steps: int
    final_measures: dict[str, float | None]
    """The last step's measures, by their metrics.jsonl names (docs/metrics.md)."""
    initial_accuracy: float | None
    final_accuracy: float | None
    model: Path | None
    """The final model folder (HF format, with its model card), or None without a checkpoint."""
    final_checkpoint: Path | None
    stopped_early_at: int | None
    skipped_steps: int
    alerts: tuple[dict[str, Any], ...]
    """The live monitor's alerts (rule, step, evidence, cause, recipe)."""
    config: TrainConfig = field(repr=False)
    summary: dict[str, Any] = field(repr=False)
    """summary.json as written, plus what the hooks added (final_model, cold_start)."""

    def metrics(self) -> list[dict[str, Any]]:
        """Every step's record of metrics.jsonl."""
        return M.read(self.run)

    @classmethod
    def from_summary(cls, config: TrainConfig, summary: dict[str, Any]) -> TrainResult:
        records = M.read(config.out)
        last = records[-1] if records else {}
        measures = {k: v for k, v in last.items() if k in M.SCHEMA and k not in RECORD_ONLY}
        checkpoint, model = summary.get("final_checkpoint"), summary.get("final_model")
        return cls(
            run=Path(config.out), steps=summary["steps"], final_measures=measures,
            initial_accuracy=summary.get("initial_accuracy"),
            final_accuracy=summary.get("final_accuracy"),
            model=Path(model) if model else None,
            final_checkpoint=Path(checkpoint) if checkpoint else None,
            stopped_early_at=summary.get("stopped_early_at"),
            skipped_steps=summary.get("skipped_steps", 0),
            alerts=tuple(summary.get("alerts", ())), config=config, summary=summary,
        )


def _run_training(config: TrainConfig, resume: Resume, hooks: Sequence[StepHook]) -> TrainResult:
    from opd.recipes.cold_start import ColdStartHandover
    from opd.run.hooks import run_hooks
    from opd.run.loop import run_training

    standard = run_hooks(config)  # stops here, before any model loads, on a missing tracker
    handover = [ColdStartHandover(config)] if config.on_failure == "cold-start" else []
    summary = run_training(config, resume=resume, hooks=[*standard, *hooks, *handover])
    return TrainResult.from_summary(config, summary)


def train(config: ConfigLike = None, /, *, resume: Resume = False, hooks: Sequence[StepHook] = (),
          profile: str | None = None, **settings: Any) -> TrainResult:
    """Run OPD (`opd train`): the student samples, the teacher scores every token, the student
    learns. `profile` (e.g. "cpu-small") sits under the settings; `resume` continues the run
    in `out` (`"auto"`: when it has a complete checkpoint, else starts one); `hooks` are added
    to the loop (`opd.StepHook`). Writes the run folder (report, checkpoints with model cards,
    the final model folder) and feeds the `report_to` trackers."""
    return _run_training(_config(TrainConfig, config, settings, profile=profile), resume, hooks)


def grpo(config: ConfigLike = None, /, *, resume: Resume = False, hooks: Sequence[StepHook] = (),
         profile: str | None = None, **settings: Any) -> TrainResult:
    """GRPO (`opd grpo`): the same loop with the outcome reward only (distill_weight 0,
    outcome_weight 1 unless set); the prompts need answers."""
    config = _config(TrainConfig, config, settings, profile=profile,
                     defaults={"outcome_weight": 1.0}, forced={"distill_weight": 0.0})
    return _run_training(config, resume, hooks)


# -- evaluation -------------------------------------------------------------------------------
def evaluate(model: str | None = None, prompts: str | None = None, *, config: ConfigLike = None,
             **settings: Any) -> EvalResult:
    """avg@n accuracy of a model folder (or hub id) on a prompt set with answers (`opd eval`):
    `samples_per_prompt` samples per prompt at `temperature`, each checked by the `verifier`."""
    from opd.evaluation.accuracy import evaluate_model

    return evaluate_model(_config(EvalConfig, config, {"model": model, "prompts": prompts,
                                                       **settings}))


# -- diagnosis --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """One check behind a verdict: the measured value, the threshold it is held against, the
    margin (value − threshold) and whether it passed (None: not decided)."""

    name: str
    value: float | None
    threshold: float | None
    margin: float | None
    passed: bool | None
    note: str


@dataclass(frozen=True)
class TeacherDiagnosis:
    """What the diagnosis found for one teacher."""

    path: str
    verdict: str
    checks: dict[str, Check]
    warnings: tuple[str, ...]
    advice: tuple[str, ...]
    measures: dict[str, float]
    """Step-0 measures on the student's rollouts at top-`thresholds.pattern_k`."""
    accuracy_own_template: float | None
    recommended_max_new_tokens: int | None
    across_tokenizers: dict[str, Any] | None
    """For a teacher with another tokenizer (`cross_tokenizer`): `aligned_share` (the share
    of the student's tokens the pattern measures read), `shared_vocabulary`,
    `student_vocabulary` and, per part of the diagnosis, whether it is exact or approximate
    (`measures`); None with one vocabulary, where every measure is exact."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], pattern_k: int) -> TeacherDiagnosis:
        decision = data["decision"]
        checks = {name: Check(name, c["value"], c["threshold"], c["margin"], c["passed"], c["note"])
                  for name, c in decision["checks"].items()}
        measures = data["pattern"]["by_k"][str(pattern_k)]["overall"]
        return cls(data["path"], decision["verdict"], checks, tuple(decision["warnings"]),
                   tuple(decision["advice"]), dict(measures), data.get("accuracy_own_template"),
                   data.get("recommended_max_new_tokens"), data.get("across_tokenizers"))


@dataclass(frozen=True)
class Cost:
    """What the diagnosis cost, and its share of the training run it judges."""

    wall_seconds: float
    token_passes: int
    percent_of_training_run: float
    stage_seconds: dict[str, float]


@dataclass(frozen=True)
class Diagnosis:
    """The verdict on a teacher–student pair (`opd diagnose`, docs/diagnose.md): go,
    pattern-mismatch, no-novelty or horizon-risk, with the evidence per check."""

    verdict: str
    teacher: TeacherDiagnosis
    teacher2: TeacherDiagnosis | None
    thresholds: Thresholds
    cost: Cost
    student_accuracy: float | None
    warnings: tuple[str, ...]
    out: Path | None
    """Where diagnosis.json, report.md and the figures were written (None: not written)."""
    data: dict[str, Any] = field(repr=False)
    """The whole diagnosis, as diagnosis.json holds it."""

    @property
    def checks(self) -> dict[str, Check]:
        """The first teacher's checks."""
        return self.teacher.checks

    @property
    def advice(self) -> tuple[str, ...]:
        return self.teacher.advice

    @property
    def forecast(self) -> dict[str, Any]:
        """The forecast of the gap recovery of the planned run (docs/diagnose.md#forecast):
        `shown`, and then `expected`, `low`, `high` (80%), the `measurement` that drove it and
        its `value`, the calibration behind it and `notes`; or `reason` why there is none."""
        return self.data["forecast"]

    @property
    def control(self) -> dict[str, Any] | None:
        """Does the teacher matter (`control=True`): accuracy before and after the short run
        with the teacher's signal (`none`) and each control, the gains, and each control's
        `teacher_share` of the gain; None without `control`."""
        return self.data.get("control")

    def table(self) -> str:
        """The evidence as text: one line per check (value, threshold, margin, passed)."""
        lines = [f"verdict: {self.verdict}"]
        for label, teacher in (("teacher", self.teacher), ("teacher2", self.teacher2)):
            if teacher is None:
                continue
            lines.append(f"{label} {teacher.path}: {teacher.verdict}")
            for check in teacher.checks.values():
                lines.append(f"  {check.name:<10} value {fmt(check.value)}  threshold "
                             f"{fmt(check.threshold)}  margin {fmt(check.margin)}  "
                             f"passed {fmt(check.passed)}")
            lines += [f"  advice: {a}" for a in teacher.advice]
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append(f"cost: {self.cost.wall_seconds:.1f} s, "
                     f"{self.cost.percent_of_training_run:.2f}% of the training run")
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, data: dict[str, Any], out: Path | None) -> Diagnosis:
        thresholds = Thresholds(**data["thresholds"])
        k = thresholds.pattern_k
        cost = data["cost"]
        return cls(
            verdict=data["verdict"], teacher=TeacherDiagnosis.from_dict(data["teacher"], k),
            teacher2=TeacherDiagnosis.from_dict(data["teacher2"], k) if data.get("teacher2") else None,
            thresholds=thresholds,
            cost=Cost(cost["wall_seconds"], cost["token_passes"], cost["percent_of_training_run"],
                      dict(cost["stage_seconds"])),
            student_accuracy=data["student"].get("accuracy"), warnings=tuple(data["warnings"]),
            out=out, data=data,
        )


def diagnose(student: str | None = None, teacher: str | None = None, prompts: str | None = None,
             *, out: str | Path | None = None, config: ConfigLike = None,
             **settings: Any) -> Diagnosis:
    """Before training: will OPD work for this pair, why, and what to do (`opd diagnose`).
    Measures on the student's own rollouts; with `out`, also writes diagnosis.json, report.md
    and figures there. `teacher2=` compares a second teacher."""
    from opd.doctor.measure import run_diagnosis
    from opd.doctor.report import write_outputs

    values = {"student": student, "teacher": teacher, "prompts": prompts,
              "out": None if out is None else str(out), **settings}
    diagnose_config = _config(DiagnoseConfig, config, values)
    data = run_diagnosis(diagnose_config, writes=out is not None)
    folder = write_outputs(data, out) if out is not None else None
    return Diagnosis.from_dict(json.loads(json.dumps(data)), folder)


def diagnose_teachers(student: str | None = None, prompts: str | None = None, *,
                      teachers: Mapping[str, str] | None = None, out: str | Path | None = None,
                      config: ConfigLike = None, **settings: Any) -> dict[str, Diagnosis]:
    """`opd diagnose` with several teachers (`teachers`: a value of the prompt field
    `teacher_field` → teacher folder): one diagnosis per teacher on its own prompts, each in
    `out/<value>`. A prompt whose value has no teacher stops before any measuring."""
    from dataclasses import replace

    from opd.data.prompts import load_prompts, source_of
    from opd.doctor.measure import run_diagnosis
    from opd.doctor.report import write_outputs
    from opd.io import check_output_folder, is_url
    from opd.models.loading import check_model_folder
    from opd.teachers.build import teacher_of_each_prompt
    from opd.teachers.client import TeacherClient

    values = {"student": student, "prompts": prompts, "teachers": teachers,
              "out": None if out is None else str(out), **settings}
    diagnose_config = _config(DiagnoseConfig, config, values)
    if not diagnose_config.teachers:
        raise OPDError("teachers: no teachers given; pass teachers={value: folder, ...} (or use "
                       "diagnose for one teacher)")
    if out is not None:
        check_output_folder(out, "out")
    records = load_prompts(diagnose_config.prompts, **source_of(diagnose_config))
    used = set(teacher_of_each_prompt(records, diagnose_config.teacher_field,
                                      diagnose_config.teachers))
    for name in sorted(used):  # every teacher, before the first diagnosis is written
        path = diagnose_config.teachers[name]
        if is_url(path):
            TeacherClient(path, timeout=diagnose_config.teacher_timeout).info()
        else:
            check_model_folder(path, f"teachers.{name}",
                               trust_remote_code=diagnose_config.trust_remote_code)
    diagnoses = {}
    for name in sorted(used):
        folder = None if out is None else Path(out) / name
        one = replace(diagnose_config, teacher=diagnose_config.teachers[name], teachers={},
                      out=str(folder) if folder else diagnose_config.out)
        data = run_diagnosis(one, writes=folder is not None, value=name)
        written = write_outputs(data, folder) if folder is not None else None
        diagnoses[name] = Diagnosis.from_dict(json.loads(json.dumps(data)), written)
    return diagnoses


# -- recipes ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ColdStartResult:
    """The off-policy cold start (`opd cold-start`): its three stages' outputs."""

    out: Path
    teacher_data: Path
    """teacher_data.jsonl: the teacher's (verified) responses."""
    sft: Path
    """The student after fine-tuning on them (HF folder)."""
    opd: TrainResult
    """The OPD run from `sft`."""
    report: dict[str, Any] = field(repr=False)
    """cold_start.json."""


def cold_start(student: str | None = None, teacher: str | None = None, prompts: str | None = None,
               *, out: str | Path | None = None, config: ConfigLike = None, resume: bool = False,
               force: bool = False, profile: str | None = None, **settings: Any) -> ColdStartResult:
    """Teacher data → SFT → gate → OPD (`opd cold-start`); the first two stages take the
    `cold_start` settings (`cold_start={"sft_steps": 400}`). Each stage is kept in `out` and
    skipped on `resume` (True or "auto") once complete. When the fine-tuned student has not moved to the
    teacher's pattern, `opd.recipes.cold_start.GateStopped` (an OPDError) is raised with the
    numbers and the next step, its report written, unless `force`."""
    from opd.recipes.cold_start import opd_stage, run_cold_start

    values = {"student": student, "teacher": teacher, "prompts": prompts,
              "out": None if out is None else str(out), **settings}
    train_config = _config(TrainConfig, config, values, profile=profile)
    report = run_cold_start(train_config, resume=resume, force=force)
    stages = report["stages"]
    opd_config = opd_stage(train_config)
    return ColdStartResult(Path(train_config.out), Path(stages["teacher_data"]), Path(stages["sft"]),
                           TrainResult.from_summary(opd_config, report["opd"]), report)


@dataclass(frozen=True)
class Selection:
    """Teacher-aligned prompts (`opd select-prompts`)."""

    out: Path
    prompts: Path
    """prompts.jsonl: the kept prompts and those mixed in, rendered."""
    train_config: Path
    """train.yaml: the settings OPD needs to use them (`opd.train(config=…)`)."""
    counts: dict[str, int]
    step0: dict[str, Any]
    """Step-0 measures of each prompt set (before and after selection)."""
    entropy_effect: float | None
    """Student entropy in the trial, selected minus unselected prompts (None without trial)."""
    warnings: tuple[str, ...]
    data: dict[str, Any] = field(repr=False)
    """selection.json."""


def select_prompts(student: str | None = None, teacher: str | None = None,
                   prompts: str | None = None, out: str | Path | None = None, *,
                   config: ConfigLike = None, **settings: Any) -> Selection:
    """Render the candidates with the teacher's template, rank them by step-0 alignment, keep
    the top fraction, mix in others, and run a short trial (`opd select-prompts`)."""
    from opd.recipes.select_prompts import run_select_prompts

    values = {"student": student, "teacher": teacher, "prompts": prompts,
              "out": None if out is None else str(out), **settings}
    select_config = _config(SelectConfig, config, values)
    data = run_select_prompts(select_config)
    folder = Path(select_config.out)
    return Selection(folder, folder / "prompts.jsonl", folder / "train.yaml", dict(data["counts"]),
                     data["step0"], (data["trial"] or {}).get("entropy_effect"),
                     tuple(data["warnings"]), data)


# -- the teacher as a service ----------------------------------------------------------------
def serve_teacher(model: str | None = None, *, config: ConfigLike = None,
                  **settings: Any) -> None:
    """Serve a teacher over HTTP until interrupted (`opd serve-teacher`); training runs use it
    with `teacher="http://host:port"`. Needs the `serve` extra."""
    from opd.teachers.server import ServeConfig, serve

    serve(_config(ServeConfig, config, {"model": model, **settings}))


# -- reports and the model organisms ----------------------------------------------------------
def report(*runs: str | Path, compare: str | Path | None = None) -> list[Path]:
    """report.md with its figures for each run folder (`opd report`), and with `compare` one
    PNG of every run's curves; returns the files written."""
    from opd.run.report import check_compare_path, check_run_folder, plot_curves, write_run_report

    records = {run: check_run_folder(run) for run in runs}  # every input, before any output
    if compare is not None:
        check_compare_path(compare)
    written = [write_run_report(run) for run in runs]
    if compare is not None:
        Path(compare).parent.mkdir(parents=True, exist_ok=True)
        written.append(plot_curves({Path(r).name: rows for r, rows in records.items()},
                                   Path(compare)))
    return written


def reproduce(profile: str | None = None, out: str | Path | None = None, *,
              config: ConfigLike = None, **settings: Any) -> dict[str, Any]:
    """Re-run the study's findings on the zoo and judge each by its rule (`opd reproduce`):
    writes OUT/report.md, OUT/results.json and the figures; returns results.json's contents
    (`["findings"]`: each finding's claims, intervals and verdict)."""
    from opd.study.run import ReproduceConfig, run_reproduce

    values = {"profile": profile, "out": None if out is None else str(out), **settings}
    return run_reproduce(_config(ReproduceConfig, config, values))


@dataclass(frozen=True)
class Zoo:
    """The model organisms (`opd lab build`): HF model folders with planted properties and
    the prompt sets they were made with (README.md, docs/results.md)."""

    root: Path
    profile: str
    models: dict[str, Path]
    """student, teacher-aligned, teacher-foreign, … → folder."""
    prompt_sets: dict[str, Path]
    """teacher-train, eval-chain-d2, … → .jsonl with answers."""
    accuracy: dict[str, dict[str, float]]
    """model → evaluation set (and group: student, subskill) → accuracy."""
    data: dict[str, Any] = field(repr=False)
    """zoo.json."""


def build_zoo(profile: str = "quick", root: str | Path = ".opd-cache/zoo",
              only: Sequence[str] | None = None, progress: bool = True) -> Zoo:
    """Build (or load from its cache in `root/profile`) the zoo: `quick` in minutes on a CPU,
    `full` for the documented results; `only` builds just those models (and what they start
    from)."""
    from opd.io import check_output_folder
    from opd.lab.zoo import build_zoo_stages

    check_output_folder(root, "root")
    folder = Path(root) / profile
    data = build_zoo_stages(folder, profile, progress=progress, only=only)
    return Zoo(folder, profile,
               {name: folder / m["folder"] for name, m in data["models"].items()},
               {name: folder / s["path"] for name, s in data["sets"].items()},
               {name: dict(m["accuracy"]) for name, m in data["models"].items()}, data)
