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
from opd.recipes.cold_start_report import write_report
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
from opd.run.hooks import run_hooks
from opd.run.loop import check_training_prompts, run_training
from opd.run.sft import EarlyStopping, SFTConfig, fit_sft
from opd.run.trackers import require as require_trackers
from opd.runtime import StepHook, is_main_process
from opd.step.engines import ServedSampler, VLLMEngine, engine_for_prompts, generate, require_engine
from opd.step.rollout import check_prompts
from opd.teachers.client import TeacherClient


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
    return dataclasses.replace(train, student=str(out / "sft"), out=str(out / "opd"),
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


def run_cold_start(train: TrainConfig, *, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """All stages into `train.out` (settings of the first two in `train.cold_start`): teacher
    data, SFT with early stopping, the gate, OPD; returns (and writes) the stage report.
    Raises `GateStopped` after writing the report when the gate fails, unless `force`."""
    cold = train.cold_start
    out = Path(train.out)
    report_path = out / "cold_start.json"
    check_output_folder(out, "out")
    if out.exists() and any(out.iterdir()) and not resume:
        raise OPDError(f"out: {str(out)!r} already holds a cold-start run; pass --resume to "
                       "continue it or choose a new --out (nothing was changed)")
    if not train.teacher:
        raise OPDError("teacher: cold start needs a teacher; pass --teacher PATH")
    get_verifier(train.verifier)
    require_engine(train.rollout_engine)
    require_trackers(train.report_to)
    # Everything that can be refused is looked at before the first file is written.
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
    data_path, sft_dir = out / "teacher_data.jsonl", out / "sft"
    common = dict(dtype=train.dtype, trust_remote_code=train.trust_remote_code)
    # The models of the stages still to run are loaded now, so that weights which cannot be
    # used stop the recipe before its folder exists; the others are only looked at.
    generates = not data_path.exists()
    teacher = (load_model(train.teacher, "teacher", trainable=False, **common)
               if generates and served is None else None)
    student = (load_model(train.student, "student", trainable=True, **common)
               if not (sft_dir / "config.json").exists() else None)
    for path, role in ((train.student, "student"), *(() if served else [(train.teacher, "teacher")])):
        check_model_folder(path, role, tokenizer=False, trust_remote_code=train.trust_remote_code)
    check_prompts(records, teacher_tok, None, who="the teacher's rendering",
                  limit=context_window(train.teacher), limit_name="the teacher's context window",
                  fix="shorten or remove the row", chat_template_kwargs=train.chat_template_kwargs)
    check_training_prompts(train, train_records, student_tok, teacher_tok, eval_records)
    report: dict[str, Any] = _read_report(report_path)
    engine: VLLMEngine | ServedSampler | None = served  # a served teacher samples on its server
    if teacher is not None and train.rollout_engine == "vllm":
        texts = [render_prompt(r.messages, teacher_tok, chat_template_kwargs=train.chat_template_kwargs)
                 for r in records]
        engine = engine_for_prompts(
            train.teacher, teacher_tok, texts, max_new_tokens=train.max_new_tokens,
            dtype=next(teacher.parameters()).dtype, settings=train.vllm,
            context_window=context_window(train.teacher), trust_remote_code=train.trust_remote_code)
    out.mkdir(parents=True, exist_ok=True)

    if generates:
        start = time.perf_counter()
        rows = generate_teacher_data(
            teacher, teacher_tok, records, cold, max_new_tokens=train.max_new_tokens,
            verifier=train.verifier, seed=train.seed, progress=train.progress,
            chat_template_kwargs=train.chat_template_kwargs, engine=engine,
        )
        if not rows:
            raise OPDError("cold start: the teacher produced no usable response (none verified "
                           "correct or all truncated); raise max_attempts or max_new_tokens")
        write_jsonl_atomic(data_path, rows)
        report["teacher_data"] = {
            "prompts": len(records), "responses_kept": len(rows),
            "prompts_covered": len({r["prompt_index"] for r in rows}),
            "seconds": round(time.perf_counter() - start, 1),
        }
        del teacher
    rows = read_jsonl(data_path)

    train_prompts, held_prompts = split_prompts(len(records), cold.sft_validation_share,
                                                train.seed)
    gate_records = [records[i] for i in held_prompts][: cold.gate_prompts] or records[:1]
    data_notes = data_warnings(rows, set(train_prompts), cold.min_prompts, student_tok)
    _say(data_notes)

    if student is not None:
        start = time.perf_counter()
        held = set(held_prompts)
        examples = {split: [(r["messages"], r["response"]) for r in rows
                            if (r["prompt_index"] in held) == (split == "validation")]
                    for split in ("train", "validation")}
        if not examples["train"]:
            raise OPDError("cold start: every kept teacher response belongs to a held-out prompt; "
                           "give more prompts (--cold-start.prompts) or a lower "
                           "--cold-start.sft-validation-share")
        dropout = [] if cold.sft_dropout else disable_dropout(student)
        run = fit_sft(
            student, student_tok, examples["train"],
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
            student_tok.save_pretrained(tmp)
        del student
        report["sft"] = {
            "examples": len(examples["train"]), "validation_examples": len(examples["validation"]),
            "prompts": len(train_prompts), "validation_prompts": len(held_prompts),
            "cap": cold.sft_steps, "steps": run.steps, "best_step": run.best_step or run.steps,
            "stopped_early": run.stopped_early, "first_loss": run.train_losses[0],
            "last_loss": run.train_losses[-1], "best_validation_loss": run.best_loss,
            "train_losses": run.train_losses,
            "validation_losses": [list(point) for point in run.validation],
            "seconds": round(time.perf_counter() - start, 1),
            "warnings": sft_warnings(run, cold.sft_steps, len(examples["train"]),
                                     cold.sft_batch_size),
        }
        report.pop("gate", None)
        _say(report["sft"]["warnings"])
        write_text_atomic(report_path, json.dumps(report, indent=2))

    if "gate" not in report:
        start = time.perf_counter()
        report["gate"] = measure_gate(train, str(sft_dir), gate_records)
        report["gate"]["seconds"] = round(time.perf_counter() - start, 1)
        report["gate"]["warnings"] = accuracy_warning(report["gate"])
        _say(report["gate"]["warnings"])
    gate = report["gate"]
    report["warnings"] = [*data_notes, *report.get("sft", {}).get("warnings", []),
                          *gate.get("warnings", [])]
    write_text_atomic(report_path, json.dumps(report, indent=2))
    if not gate["passed"]:
        line = gate_line(gate, report.get("sft", {}),
                         next_step(report.get("sft", {}), report["warnings"], cold))
        report["stopped"] = None if force else f"{line}; --force runs OPD anyway"
        if not force:
            write_report(out, report)
            raise GateStopped(report["stopped"], report)
        _say([f"{line}; --force: OPD runs anyway"])

    opd_config = opd_stage(train)
    opd_resume = (out / "opd").exists()
    report["opd"] = run_training(opd_config, resume=opd_resume, hooks=run_hooks(opd_config))
    trained = report["opd"].get("final_model") or report["opd"].get("final_checkpoint")
    if gate["accuracy"] is not None and trained:
        after = held_out_accuracy(*load_for_evaluation(str(trained), "student", train), train,
                                  gate_records)
        gate["accuracy"]["student_after_opd"] = sum(after) / len(after)
    report["stages"] = {"teacher_data": str(data_path), "sft": str(sft_dir),
                        "opd": str(out / "opd")}
    write_report(out, report)
    return report


def _say(lines: Sequence[str]) -> None:
    if is_main_process():
        for line in lines:
            print(f"[opd cold-start] {line}", flush=True)


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
