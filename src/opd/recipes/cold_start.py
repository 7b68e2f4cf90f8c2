"""Off-policy cold start (docs/method.md#recipes): the teacher writes responses, the student is
fine-tuned on them, then OPD runs from that checkpoint.

Its stages, each kept in the output folder and each skipped when its output is already
complete, so a killed run continues where it stopped:
    teacher_data.jsonl   the teacher's responses (verified-correct ones when answers exist)
    sft/                 the student after supervised fine-tuning on them (HF folder): a share
                         of the prompts is held out, and the fine-tuning stops once their
                         loss stops improving, keeping the best weights
    (gate)               the fine-tuned student measured as `opd diagnose` measures a pair
                         (`recipes.gate`); a repair that did not take stops here with one line
    opd/                 the OPD run from sft/ (resumable like any `opd train` run)
cold_start.json and report.md show each stage's numbers side by side.

`ColdStartHandover` is the step hook through which `opd train --set on_failure=cold-start`
runs this recipe when the live monitor stops a failing run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from opd.config.training import ColdStartConfig, TrainConfig
from opd.data.prompts import PromptRecord, load_prompts, render_prompt, require_answers, source_of
from opd.errors import OPDError
from opd.evaluation.verify import get_verifier
from opd.io import (
    atomic_folder,
    check_output_folder,
    is_url,
    read_jsonl,
    write_jsonl_atomic,
    write_text_atomic,
)
from opd.models.loading import (
    check_model_folder,
    check_same_vocabulary,
    context_window,
    disable_dropout,
    load_model,
    load_tokenizer,
    original_config,
)
from opd.recipes.cold_start_report import REPORT_FILE, write_report
from opd.recipes.gate import (
    accuracy_warning,
    data_warnings,
    gate_line,
    held_out_accuracy,
    load_for_evaluation,
    measure_gate,
    next_step,
    sft_warnings,
    split_prompts,
)
from opd.run.folder import Resume
from opd.run.hooks import run_hooks
from opd.run.loop import check_training_prompts, run_training
from opd.run.sft import EarlyStopping, SFTConfig, fit_sft
from opd.run.trackers import require as require_trackers
from opd.runtime import StepHook, is_main_process
from opd.step.engines import ServedSampler, VLLMEngine, engine_for_prompts, generate, require_engine
from opd.step.rollout import check_prompts
from opd.teachers.client import TeacherClient

TEACHER_DATA_FILE, SFT_FOLDER, OPD_FOLDER = "teacher_data.jsonl", "sft", "opd"
"""The stages' outputs inside the cold start's folder."""


def generate_teacher_data(
    teacher, tokenizer, records: Sequence[PromptRecord], config: ColdStartConfig, *,
    max_new_tokens: int, verifier: str, seed: int, progress: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
    engine: VLLMEngine | ServedSampler | None = None,
) -> list[dict[str, Any]]:
    """Teacher responses per prompt, deduplicated; with answers and keep != all, only the
    verified-correct ones, re-sampling unsolved prompts up to `max_attempts` times. `engine`
    (given the teacher's weights, or a served teacher's client with `teacher` None) samples
    them when set, else opd's own sampler."""
    check = get_verifier(verifier)
    with_answers = all(r.answer is not None for r in records)
    keep = config.keep if config.keep != "auto" else ("correct" if with_answers else "all")
    if keep == "correct":
        require_answers(records, "cold_start.prompts", "cold_start.keep=correct")
    texts = [render_prompt(r.messages, tokenizer, chat_template_kwargs=chat_template_kwargs)
             for r in records]
    rows: list[dict[str, Any]] = []
    seen: set[tuple[int, str]] = set()
    pending = list(range(len(records)))
    bar = tqdm(total=len(records), desc="teacher data", disable=not progress, leave=False)
    for attempt in range(config.max_attempts if keep == "correct" else 1):
        if not pending:
            break
        rollouts = generate(
            engine, teacher, tokenizer, [texts[i] for i in pending], n=config.samples_per_prompt,
            max_new_tokens=max_new_tokens, temperature=config.temperature, top_p=config.top_p,
            seed=seed + 7919 * attempt, prompt_ids=pending, batch_size=256,
        )
        solved: set[int] = set()
        for row, text, cut in zip(rollouts.prompt_index.tolist(), rollouts.texts,
                                  rollouts.truncated.tolist(), strict=True):
            index = pending[row]
            record = records[index]
            correct = None if record.answer is None else bool(check(text, record.answer))
            if (keep == "correct" and not correct) or cut or (index, text) in seen:
                continue
            seen.add((index, text))
            solved.add(index)
            rows.append({"prompt_index": index, "messages": record.messages, "response": text,
                         "answer": record.answer, "correct": correct, "attempt": attempt})
        bar.update(len(solved))
        pending = [i for i in pending if i not in solved]
    bar.close()
    return rows


def opd_stage(train: TrainConfig) -> TrainConfig:
    """The settings of the OPD stage: the run's own, from the fine-tuned student in OUT/sft,
    into OUT/opd (named `<run>-opd` in the trackers)."""
    out = Path(train.out)
    return dataclasses.replace(train, student=str(out / SFT_FOLDER), out=str(out / OPD_FOLDER),
                               run_name=f"{train.run_name or out.resolve().name}-opd")


def _read_report(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report = None
    if not isinstance(report, dict):
        raise OPDError(f"--resume: {path} is damaged; delete it (the stages it reports on are "
                       "kept and found again) and run again")
    return report


class GateStopped(OPDError):
    """The gate before OPD found the fine-tuned student's pattern (or accuracy) not moved
    enough: its message is the one line with the numbers and the next step; `report` is
    cold_start.json as written."""

    def __init__(self, line: str, report: dict[str, Any]) -> None:
        super().__init__(line)
        self.report = report


@dataclass(frozen=True)
class ColdStartInputs:
    """What the recipe reads, checked before anything is written: the prompts the teacher
    answers, the OPD stage's training and evaluation prompts, both tokenizers and the served
    teacher's client (None for a teacher folder)."""

    records: list[PromptRecord]
    train_records: list[PromptRecord]
    eval_records: list[PromptRecord]
    student_tokenizer: Any
    teacher_tokenizer: Any
    served: TeacherClient | None


@dataclass(frozen=True)
class TeacherData:
    """The teacher's kept responses, and the split of their prompts into those the student is
    fine-tuned on and those held out (for early stopping and the gate)."""

    path: Path
    rows: list[dict[str, Any]]
    train_prompts: list[int]
    held_prompts: list[int]
    gate_records: list[PromptRecord]
    warnings: list[str]


@dataclass(frozen=True)
class SFTResult:
    """The fine-tuned student's folder and the SFT stage's report (empty when an earlier run
    fine-tuned it and its report is gone)."""

    folder: Path
    summary: dict[str, Any]


@dataclass(frozen=True)
class GateResult:
    """The gate's measurements before OPD (`recipes.gate`), as cold_start.json reports them."""

    measured: dict[str, Any]


def run_cold_start(train: TrainConfig, *, resume: Resume = False, force: bool = False) -> dict[str, Any]:
    """All stages into `train.out` (settings of the first two in `train.cold_start`): teacher
    data, SFT with early stopping, the gate, OPD; returns (and writes) the stage report.
    Raises `GateStopped` after writing the report when the gate fails, unless `force`."""
    inputs = check_cold_start_inputs(train, resume)
    teacher, student = load_stage_models(train, inputs)
    check_cold_start_renderings(train, inputs)
    report = _read_report(Path(train.out) / REPORT_FILE)
    engine = teacher_engine(train, inputs, teacher)
    Path(train.out).mkdir(parents=True, exist_ok=True)
    data = collect_teacher_data(train, inputs, teacher, engine, report)
    del teacher
    sft = fine_tune(train, inputs, data, student, report)
    del student
    gate = gate_before_opd(train, data, sft, report, force=force)
    return run_opd_stage(train, data, sft, gate, report)


def check_cold_start_inputs(train: TrainConfig, resume: Resume) -> ColdStartInputs:
    """The folder, the settings, the prompt files and the tokenizers, refused with one line
    before anything is written."""
    cold, out = train.cold_start, Path(train.out)
    check_output_folder(out, "out")
    if out.exists() and any(out.iterdir()) and not resume:
        raise OPDError(f"out: {str(out)!r} already holds a cold-start run; pass --resume to "
                       "continue it or choose a new --out (nothing was changed)")
    if not train.teacher:
        raise OPDError("teacher: cold start needs a teacher; pass --teacher PATH")
    get_verifier(train.verifier)
    require_engine(train.rollout_engine)
    require_trackers(train.report_to)
    prompts_field = "cold_start.prompts" if cold.prompts else "prompts"
    records = load_prompts(cold.prompts or train.prompts, prompts_field, **source_of(train))
    train_records = load_prompts(train.prompts, **source_of(train)) if cold.prompts else records
    if cold.keep == "correct":
        require_answers(records, prompts_field, "cold_start.keep=correct")
    if train.outcome_weight:
        require_answers(train_records, "prompts", "outcome_weight > 0")
    eval_records = (load_prompts(train.eval_prompts, "eval_prompts", **source_of(train, "eval_split"))
                    if train.eval_prompts else [])
    require_answers(eval_records, "eval_prompts", "evaluation")
    served = (TeacherClient(train.teacher, timeout=train.teacher_timeout)
              if is_url(train.teacher) else None)
    student_tok = load_tokenizer(train.student, "student", train.trust_remote_code)
    teacher_tok = (served.tokenizer("teacher", train.trust_remote_code) if served
                   else load_tokenizer(train.teacher, "teacher", train.trust_remote_code))
    check_same_vocabulary(student_tok, teacher_tok, train.student, train.teacher)
    return ColdStartInputs(records, train_records, eval_records, student_tok, teacher_tok, served)


def load_stage_models(train: TrainConfig, inputs: ColdStartInputs) -> tuple[Any, Any]:
    """The teacher (in process, when its data is still to write) and the student (when it is
    still to fine-tune), loaded now so that weights which cannot be used stop the recipe
    before its folder exists; None for a stage already done."""
    out = Path(train.out)
    common = dict(dtype=train.dtype, trust_remote_code=train.trust_remote_code)
    teacher = (load_model(train.teacher, "teacher", trainable=False, **common)
               if not (out / TEACHER_DATA_FILE).exists() and inputs.served is None else None)
    student = (load_model(train.student, "student", trainable=True, **common)
               if not (out / SFT_FOLDER / "config.json").exists() else None)
    return teacher, student


def check_cold_start_renderings(train: TrainConfig, inputs: ColdStartInputs) -> None:
    """The model folders looked at, and every prompt rendered and measured for the teacher
    and for the OPD stage."""
    models = ((train.student, "student"), *(() if inputs.served else [(train.teacher, "teacher")]))
    for path, role in models:
        check_model_folder(path, role, tokenizer=False, trust_remote_code=train.trust_remote_code)
    check_prompts(inputs.records, inputs.teacher_tokenizer, None, who="the teacher's rendering",
                  limit=context_window(train.teacher), limit_name="the teacher's context window",
                  fix="shorten or remove the row", chat_template_kwargs=train.chat_template_kwargs)
    check_training_prompts(train, inputs.train_records, inputs.student_tokenizer,
                           inputs.teacher_tokenizer, inputs.eval_records)


def teacher_engine(train: TrainConfig, inputs: ColdStartInputs,
                   teacher: Any) -> VLLMEngine | ServedSampler | None:
    """What samples the teacher's responses: a served teacher's server, a vLLM engine given
    the teacher's weights, or (None) opd's own sampler."""
    if teacher is None or train.rollout_engine != "vllm":
        return inputs.served
    tok = inputs.teacher_tokenizer
    texts = [render_prompt(r.messages, tok, chat_template_kwargs=train.chat_template_kwargs)
             for r in inputs.records]
    return engine_for_prompts(
        train.teacher, tok, texts, max_new_tokens=train.max_new_tokens,
        dtype=next(teacher.parameters()).dtype, settings=train.vllm,
        context_window=context_window(train.teacher), trust_remote_code=train.trust_remote_code)


def collect_teacher_data(train: TrainConfig, inputs: ColdStartInputs, teacher: Any,
                         engine: VLLMEngine | ServedSampler | None,
                         report: dict[str, Any]) -> TeacherData:
    """Stage 1: the teacher's responses (written unless teacher_data.jsonl is complete), their
    prompts split for fine-tuning, and the warnings on the data."""
    cold, path, records = train.cold_start, Path(train.out) / TEACHER_DATA_FILE, inputs.records
    if not path.exists():
        start = time.perf_counter()
        rows = generate_teacher_data(
            teacher, inputs.teacher_tokenizer, records, cold, max_new_tokens=train.max_new_tokens,
            verifier=train.verifier, seed=train.seed, progress=train.progress,
            chat_template_kwargs=train.chat_template_kwargs, engine=engine,
        )
        if not rows:
            raise OPDError("cold start: the teacher produced no usable response (none verified "
                           "correct or all truncated); raise max_attempts or max_new_tokens")
        write_jsonl_atomic(path, rows)
        report["teacher_data"] = {
            "prompts": len(records), "responses_kept": len(rows),
            "prompts_covered": len({r["prompt_index"] for r in rows}),
            "seconds": round(time.perf_counter() - start, 1),
        }
    rows = read_jsonl(path)
    train_prompts, held_prompts = split_prompts(len(records), cold.sft_validation_share,
                                                train.seed)
    gate_records = [records[i] for i in held_prompts][: cold.gate_prompts] or records[:1]
    warnings = data_warnings(rows, set(train_prompts), cold.min_prompts, inputs.student_tokenizer)
    _say(warnings)
    return TeacherData(path, rows, train_prompts, held_prompts, gate_records, warnings)


def fine_tune(train: TrainConfig, inputs: ColdStartInputs, data: TeacherData, student: Any,
              report: dict[str, Any]) -> SFTResult:
    """Stage 2: the student fine-tuned on the teacher's responses into OUT/sft, with early
    stopping on the held-out prompts (skipped when OUT/sft is there, `student` None)."""
    cold, sft_dir = train.cold_start, Path(train.out) / SFT_FOLDER
    if student is not None:
        start = time.perf_counter()
        examples = _sft_examples(data)
        dropout = [] if cold.sft_dropout else disable_dropout(student)
        run = fit_sft(
            student, inputs.student_tokenizer, examples["train"],
            SFTConfig(steps=cold.sft_steps, lr=cold.sft_lr, batch_size=cold.sft_batch_size,
                      warmup_steps=min(20, cold.sft_steps // 10), seed=train.seed,
                      progress=train.progress, desc="cold-start sft", template=train.template,
                      chat_template_kwargs=train.chat_template_kwargs),
            validation=examples["validation"],
            stopping=EarlyStopping(every=cold.sft_eval_every, patience=cold.sft_patience),
        )
        with atomic_folder(sft_dir) as tmp:
            with original_config(dropout):
                student.save_pretrained(tmp)
            inputs.student_tokenizer.save_pretrained(tmp)
        report["sft"] = _sft_summary(cold, data, examples, run, time.perf_counter() - start)
        report.pop("gate", None)
        _say(report["sft"]["warnings"])
        write_text_atomic(Path(train.out) / REPORT_FILE, json.dumps(report, indent=2))
    return SFTResult(sft_dir, report.get("sft", {}))


def _sft_examples(data: TeacherData) -> dict[str, list[tuple[Any, str]]]:
    """(messages, response) pairs to fine-tune on ("train") and to stop early on
    ("validation", those of the held-out prompts)."""
    held = set(data.held_prompts)
    examples = {split: [(r["messages"], r["response"]) for r in data.rows
                        if (r["prompt_index"] in held) == (split == "validation")]
                for split in ("train", "validation")}
    if not examples["train"]:
        raise OPDError("cold start: every kept teacher response belongs to a held-out prompt; "
                       "give more prompts (cold_start.prompts) or a lower "
                       "cold_start.sft_validation_share")
    return examples


def _sft_summary(cold: ColdStartConfig, data: TeacherData,
                 examples: dict[str, list[tuple[Any, str]]], run: Any,
                 seconds: float) -> dict[str, Any]:
    """The SFT stage as cold_start.json reports it: sizes, curves, early stopping, warnings."""
    return {
        "examples": len(examples["train"]), "validation_examples": len(examples["validation"]),
        "prompts": len(data.train_prompts), "validation_prompts": len(data.held_prompts),
        "cap": cold.sft_steps, "steps": run.steps, "best_step": run.best_step or run.steps,
        "stopped_early": run.stopped_early, "first_loss": run.train_losses[0],
        "last_loss": run.train_losses[-1], "best_validation_loss": run.best_loss,
        "train_losses": run.train_losses,
        "validation_losses": [list(point) for point in run.validation],
        "seconds": round(seconds, 1),
        "warnings": sft_warnings(run, cold.sft_steps, len(examples["train"]), cold.sft_batch_size),
    }


def gate_before_opd(train: TrainConfig, data: TeacherData, sft: SFTResult,
                    report: dict[str, Any], *, force: bool) -> GateResult:
    """Stage 3: the fine-tuned student measured as `opd diagnose` measures a pair (unless a
    run before measured this one); a repair that did not take stops here with one line
    (`GateStopped`, after writing the report), unless `force`."""
    if "gate" not in report:
        start = time.perf_counter()
        report["gate"] = measure_gate(train, str(sft.folder), data.gate_records)
        report["gate"]["seconds"] = round(time.perf_counter() - start, 1)
        report["gate"]["warnings"] = accuracy_warning(report["gate"])
        _say(report["gate"]["warnings"])
    gate = report["gate"]
    report["warnings"] = [*data.warnings, *sft.summary.get("warnings", []),
                          *gate.get("warnings", [])]
    write_text_atomic(Path(train.out) / REPORT_FILE, json.dumps(report, indent=2))
    if not gate["passed"]:
        line = gate_line(gate, sft.summary, next_step(sft.summary, report["warnings"],
                                                      train.cold_start))
        report["stopped"] = None if force else f"{line}; --force runs OPD anyway"
        if not force:
            write_report(Path(train.out), report)
            raise GateStopped(report["stopped"], report)
        _say([f"{line}; --force: OPD runs anyway"])
    return GateResult(gate)


def run_opd_stage(train: TrainConfig, data: TeacherData, sft: SFTResult, gate: GateResult,
                  report: dict[str, Any]) -> dict[str, Any]:
    """Stage 4: OPD from OUT/sft into OUT/opd (resumed when there), then the held-out accuracy
    after it; writes and returns the whole report."""
    opd_config = opd_stage(train)
    report["opd"] = run_training(opd_config, resume=Path(opd_config.out).exists(),
                                 hooks=run_hooks(opd_config))
    trained = report["opd"].get("final_model") or report["opd"].get("final_checkpoint")
    if gate.measured["accuracy"] is not None and trained:
        after = held_out_accuracy(*load_for_evaluation(str(trained), "student", train), train,
                                  data.gate_records)
        gate.measured["accuracy"]["student_after_opd"] = sum(after) / len(after)
    report["stages"] = {"teacher_data": str(data.path), "sft": str(sft.folder),
                        "opd": opd_config.out}
    write_report(Path(train.out), report)
    return report


def _say(lines: Sequence[str]) -> None:
    if is_main_process():
        for line in lines:
            print(f"[cold start] {line}", flush=True)


class ColdStartHandover(StepHook):
    """`on_failure: cold-start`: when the live monitor stops the run, the cold-start recipe
    follows into OUT/cold-start (same teacher, prompts and settings; its OPD stage only
    warns, so it never hands over twice). Its gate is the verb's: a repair that did not take
    stops before OPD with its line. Its report joins the run's summary."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def on_end(self, summary: dict[str, Any]) -> None:
        if not any(alert.get("stops", True) for alert in summary["alerts"]):
            return  # no alert, or only warnings that do not stop a run
        repair = dataclasses.replace(self.config, out=str(Path(self.config.out) / "cold-start"),
                                     on_failure="warn")
        try:
            summary["cold_start"] = run_cold_start(repair, resume=Path(repair.out).exists())
        except GateStopped as stopped:
            _say([str(stopped)])
            summary["cold_start"] = stopped.report
