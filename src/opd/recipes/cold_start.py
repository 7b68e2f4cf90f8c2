"""Off-policy cold start (SPEC §6.1): the teacher writes responses, the student is fine-tuned
on them, then OPD runs from that checkpoint.

Three stages, each kept in the output folder and each skipped when its output is already
complete, so a killed run continues where it stopped:
    teacher_data.jsonl   the teacher's responses (verified-correct ones when answers exist)
    sft/                 the student after supervised fine-tuning on them (HF folder)
    opd/                 the OPD run from sft/ (resumable like any `opd train` run)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from opd.checkpoints import read_jsonl
from opd.config import TrainConfig
from opd.data.prompts import PromptRecord, load_prompts, render_prompt
from opd.errors import OPDError
from opd.io import write_jsonl_atomic
from opd.models import check_same_vocabulary, load_model, load_tokenizer
from opd.rollout import generate_rollouts
from opd.sft import SFTConfig, train_sft
from opd.train import run_training
from opd.verify import get_verifier


@dataclass(frozen=True)
class ColdStartConfig:
    """Settings of the teacher-data and fine-tuning stages (the OPD stage uses TrainConfig)."""

    prompts: str | None = None
    """Prompts for the teacher's responses (default: the OPD prompts)."""
    samples_per_prompt: int = 4
    """Teacher samples per prompt per attempt."""
    max_attempts: int = 3
    """Attempts per prompt until one verified-correct response is found (answers known)."""
    temperature: float = 0.7
    """Teacher sampling temperature."""
    top_p: float = 0.95
    """Teacher nucleus threshold."""
    keep: str = "auto"
    """auto (verified-correct when every prompt has an answer, else all), correct or all."""
    sft_steps: int = 200
    """Fine-tuning steps."""
    sft_lr: float = 1e-4
    """Fine-tuning peak learning rate."""
    sft_batch_size: int = 32
    """Fine-tuning examples per step."""


def generate_teacher_data(
    teacher, tokenizer, records: Sequence[PromptRecord], config: ColdStartConfig, *,
    max_new_tokens: int, verifier: str, seed: int, progress: bool = True,
) -> list[dict[str, Any]]:
    """Teacher responses per prompt, deduplicated; with answers and keep != all, only the
    verified-correct ones, re-sampling unsolved prompts up to `max_attempts` times."""
    check = get_verifier(verifier)
    with_answers = all(r.answer is not None for r in records)
    keep = config.keep if config.keep != "auto" else ("correct" if with_answers else "all")
    if keep == "correct" and not with_answers:
        raise OPDError("cold start: keep=correct needs an 'answer' on every prompt row")
    texts = [render_prompt(r.messages, tokenizer) for r in records]
    rows: list[dict[str, Any]] = []
    seen: set[tuple[int, str]] = set()
    pending = list(range(len(records)))
    bar = tqdm(total=len(records), desc="teacher data", disable=not progress, leave=False)
    for attempt in range(config.max_attempts if keep == "correct" else 1):
        if not pending:
            break
        rollouts = generate_rollouts(
            teacher, tokenizer, [texts[i] for i in pending], n=config.samples_per_prompt,
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


def run_cold_start(train: TrainConfig, config: ColdStartConfig, *, resume: bool = False
                   ) -> dict[str, Any]:
    """All three stages into `train.out`; returns (and writes) the stage report."""
    out = Path(train.out)
    report_path = out / "cold_start.json"
    if out.exists() and any(out.iterdir()) and not resume:
        raise OPDError(f"out: {str(out)!r} already holds a cold-start run; pass --resume to "
                       "continue it or choose a new --out (nothing was changed)")
    if not train.teacher:
        raise OPDError("teacher: cold start needs a teacher; pass --teacher PATH")
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = json.loads(report_path.read_text()) if report_path.exists() else {}
    student_tok = load_tokenizer(train.student, "student", train.trust_remote_code)
    teacher_tok = load_tokenizer(train.teacher, "teacher", train.trust_remote_code)
    check_same_vocabulary(student_tok, teacher_tok, train.student, train.teacher)

    data_path = out / "teacher_data.jsonl"
    if not data_path.exists():
        start = time.perf_counter()
        records = load_prompts(config.prompts or train.prompts)
        teacher = load_model(train.teacher, "teacher", trainable=False, dtype=train.dtype,
                             trust_remote_code=train.trust_remote_code)
        rows = generate_teacher_data(
            teacher, teacher_tok, records, config, max_new_tokens=train.max_new_tokens,
            verifier=train.verifier, seed=train.seed, progress=train.progress,
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
    rows = read_jsonl(data_path)

    sft_dir = out / "sft"
    if not (sft_dir / "config.json").exists():
        start = time.perf_counter()
        student = load_model(train.student, "student", trainable=True, dtype=train.dtype,
                             trust_remote_code=train.trust_remote_code)
        losses = train_sft(
            student, student_tok, [(r["messages"], r["response"]) for r in rows],
            SFTConfig(steps=config.sft_steps, lr=config.sft_lr, batch_size=config.sft_batch_size,
                      warmup_steps=min(20, config.sft_steps // 10), seed=train.seed,
                      progress=train.progress, desc="cold-start sft"),
        )
        tmp = sft_dir.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        student.save_pretrained(tmp)
        student_tok.save_pretrained(tmp)
        tmp.rename(sft_dir)
        report["sft"] = {"examples": len(rows), "steps": config.sft_steps,
                         "first_loss": losses[0], "last_loss": losses[-1],
                         "seconds": round(time.perf_counter() - start, 1)}
    report_path.write_text(json.dumps(report, indent=2))

    opd_config = dataclasses.replace(train, student=str(sft_dir), out=str(out / "opd"))
    opd_resume = (out / "opd").exists()
    report["opd"] = run_training(opd_config, resume=opd_resume)
    report["stages"] = {"teacher_data": str(data_path), "sft": str(sft_dir),
                        "opd": str(out / "opd")}
    report_path.write_text(json.dumps(report, indent=2))
    return report


def train_with_repair(config: TrainConfig, *, resume: bool = False,
                      cold_start: ColdStartConfig | None = None) -> dict[str, Any]:
    """`opd train`: run OPD; with on_failure=cold-start, a run the monitor stops is followed
    by the cold-start recipe into OUT/cold-start (same teacher, prompts and settings)."""
    summary = run_training(config, resume=resume)
    if config.on_failure == "cold-start" and summary["alerts"]:
        repair = dataclasses.replace(config, out=str(Path(config.out) / "cold-start"),
                                     on_failure="warn")
        summary["cold_start"] = run_cold_start(
            repair, cold_start or ColdStartConfig(), resume=Path(repair.out).exists()
        )
    return summary
