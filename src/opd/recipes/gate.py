"""The cold start's checks on itself (docs/method.md#recipes): whether the teacher data can teach
the pattern rather than the answers, what the fine-tuning's two loss curves say, and the gate
before OPD, which measures the fine-tuned student as `opd diagnose` does (the overlap share on
its own rollouts against the doctor's threshold; held-out accuracy beside the teacher's).

The data and curve checks are pure functions of numbers; `measure_gate` loads the models.
Their advice names settings by config key (`cold_start.sft_steps`): the recipe runs under
`opd cold-start`, `opd train --on-failure cold-start` and `opd reproduce`, and the key is the
spelling YAML, `--set` and the Python API share.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from opd.config.training import TrainConfig
from opd.data.prompts import PromptRecord
from opd.doctor.measure import DiagnoseConfig, alignment_by_prompt, load_pair
from opd.doctor.rules import Thresholds, mean_se, pattern_check
from opd.evaluation.accuracy import evaluate
from opd.models.loading import load_model, load_tokenizer
from opd.run.sft import SFTRun
from opd.step.engines import ServedSampler

MEMORISATION_RISE = 0.05
"""Rise of the last validation loss over its best (5%) that, with the training loss still
falling, counts as learning the training answers by heart rather than the pattern."""


def split_prompts(count: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) prompt indices: a seeded `share` of `count` prompts held out, at
    least one when there are two or more, and at least one left to train on."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held = min(max(1, round(share * count)), count - 1) if count > 1 else 0
    return sorted(order[held:]), sorted(order[:held])


def data_warnings(rows: Sequence[dict[str, Any]], train_prompts: set[int], min_prompts: int,
                  tokenizer: Any) -> list[str]:
    """Up front, before the fine-tuning: too few distinct prompts for the responses' length
    and variety (the student can learn them by heart instead of the pattern)."""
    rows = [r for r in rows if r["prompt_index"] in train_prompts]
    covered = {r["prompt_index"] for r in rows}
    if len(covered) >= min_prompts:
        return []
    lengths = [len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in rows]
    variety = len({(r["prompt_index"], r["response"]) for r in rows}) / max(len(covered), 1)
    return [f"teacher data: only {len(covered)} distinct training prompts (fewer than "
            f"cold_start.min_prompts={min_prompts}) for responses of "
            f"{sum(lengths) / max(len(lengths), 1):.0f} "
            f"tokens on average, {variety:.1f} distinct responses per prompt: the student may learn "
            "these answers by heart instead of the pattern; give more prompts with "
            "cold_start.prompts"]


def sft_warnings(run: SFTRun, cap: int, examples: int, batch_size: int) -> list[str]:
    """After the fine-tuning: memorisation (the validation loss rose while the training loss
    fell) and a cap reached while the validation loss was still improving."""
    if not run.validation or run.best_step is None:
        return []
    warnings = []
    last_step, last = run.validation[-1]
    best = run.best_loss or 0.0
    window = max(1, last_step - run.best_step)
    at_best = run.train_losses[max(0, run.best_step - window):run.best_step]
    at_end = run.train_losses[-window:]
    train_fell = sum(at_end) / len(at_end) < sum(at_best) / len(at_best)
    if last > best * (1 + MEMORISATION_RISE) and train_fell:
        epochs = run.best_step * batch_size / max(examples, 1)
        warnings.append(
            f"sft: memorisation: the validation loss rose from {best:.3f} (step {run.best_step}) "
            f"to {last:.3f} (step {last_step}) while the training loss fell; the weights of step "
            f"{run.best_step} ({epochs:.1f} epochs) are kept. Give more prompts with "
            "cold_start.prompts, or fewer epochs (a lower cold_start.sft_steps)")
    if not run.stopped_early and run.best_step == run.steps == cap:
        warnings.append(
            f"sft: the validation loss was still improving at the cap of {cap} steps "
            f"({best:.3f}); raise cold_start.sft_steps")
    return warnings


def diagnose_config(train: TrainConfig, student: str) -> DiagnoseConfig:
    """How the gate samples and scores: as OPD will (temperature, templates, the teacher's view
    of the prompt, length cap), with the doctor's thresholds and no continuations."""
    return DiagnoseConfig(
        student=student, teacher=train.teacher, student_template=train.template,
        teacher_prompt=train.teacher_prompt, samples_per_prompt=4,
        max_new_tokens=train.max_new_tokens, temperature=train.temperature, top_p=train.top_p, depths=(),
        k=(Thresholds().pattern_k,), verifier=train.verifier, seed=train.seed, dtype=train.dtype,
        progress=False, trust_remote_code=train.trust_remote_code,
        teacher_timeout=train.teacher_timeout,
    )


def held_out_accuracy(model: Any, tokenizer: Any, train: TrainConfig,
                      records: Sequence[PromptRecord],
                      served: ServedSampler | None = None) -> list[float]:
    """Greedy per-prompt correctness of `model` (or of the teacher `served`, model None) on
    `records`, prompts rendered as OPD renders them."""
    return evaluate(model, tokenizer, records, temperature=0.0,
                    max_new_tokens=train.max_new_tokens, verifier=train.verifier,
                    template=train.template, chat_template_kwargs=train.chat_template_kwargs,
                    engine=served).per_prompt


def load_for_evaluation(path: str, role: str, train: TrainConfig) -> tuple[Any, Any]:
    """The model in `path` (frozen) and its tokenizer, as the run loads them."""
    return (load_model(path, role, trainable=False, dtype=train.dtype,
                       trust_remote_code=train.trust_remote_code),
            load_tokenizer(path, role, train.trust_remote_code))


def measure_gate(train: TrainConfig, fine_tuned: str, records: Sequence[PromptRecord]) -> dict[str, Any]:
    """The fine-tuned student (folder `fine_tuned`) against the teacher on held-out `records`:
    the pattern check of `opd diagnose` on its own rollouts and, with answers, its greedy
    accuracy beside the teacher's and the student's before the fine-tuning. It passes when the
    pattern check passes and the student solves some held-out prompt (where the teacher
    solves any): a student that took the teacher's pattern but lost accuracy is what OPD lifts
    (docs/results.md: 0.39 → 0.65 on the zoo's sub-skill), so a fall beyond z·SE is only a
    warning (`accuracy_warning`); one that solves nothing had learned the answers by heart,
    and 100 OPD steps did not rescue it in either world."""
    thresholds = Thresholds()
    config = diagnose_config(train, fine_tuned)
    student = load_pair(fine_tuned, "student", config)
    teacher = load_pair(train.teacher, "teacher", config, student)
    overall = alignment_by_prompt(config, records, student, teacher, thresholds.pattern_k)["overall"]
    gate: dict[str, Any] = {
        "prompts": len(records), "rollouts_per_prompt": config.samples_per_prompt,
        "pattern": pattern_check(overall["overlap_share"], thresholds),
        "overlap_ratio": overall["overlap_ratio"], "accuracy": None,
    }
    if all(r.answer is not None for r in records):
        after = held_out_accuracy(student.model, student.tokenizer, train, records)
        solved = held_out_accuracy(teacher.model, teacher.tokenizer, train, records,
                                   teacher.served.client if teacher.served else None)
        del student, teacher
        before = held_out_accuracy(*load_for_evaluation(train.student, "student", train), train,
                                   records)
        change, se = mean_se([a - b for a, b in zip(after, before, strict=True)])
        gate["accuracy"] = {
            "student_before": sum(before) / len(before), "student_after_sft": sum(after) / len(after),
            "teacher": sum(solved) / len(solved), "change": change, "change_se": se,
            "fell": change < -thresholds.z * (se or 0.0),
            "solves_none": sum(after) == 0 < sum(solved),
        }
    gate["passed"] = bool(gate["pattern"]["passed"]
                          and not (gate["accuracy"] or {}).get("solves_none"))
    return gate


def accuracy_warning(gate: dict[str, Any]) -> list[str]:
    """A held-out accuracy that the fine-tuning lowered beyond z·SE, said beside the gate."""
    accuracy = gate["accuracy"]
    if not accuracy or not accuracy["fell"] or accuracy.get("solves_none"):
        return []  # no fall, or one the gate stops on
    return [f"gate: the fine-tuning lowered held-out accuracy from {accuracy['student_before']:.2f} "
            f"to {accuracy['student_after_sft']:.2f} (teacher {accuracy['teacher']:.2f}, "
            f"{gate['prompts']} prompts); OPD may lift it back, else give more prompts with "
            "cold_start.prompts"]


def next_step(sft: dict[str, Any], warnings: Sequence[str], cold: Any) -> str:
    """What to change when the gate stops the cold start, from what the fine-tuning showed."""
    if not sft.get("stopped_early") and sft.get("best_step") == sft.get("cap"):
        return (f"raise cold_start.sft_steps (the validation loss was still falling at the cap "
                f"of {sft.get('cap')})")
    if any("memorisation" in w or "distinct training prompts" in w for w in warnings):
        return ("give more distinct prompts with cold_start.prompts (too few to learn the "
                "skill from)")
    return (f"raise cold_start.sft_lr (now {cold.sft_lr:g}) or give more prompts with "
            "cold_start.prompts")


def gate_line(gate: dict[str, Any], sft: dict[str, Any], advice: str) -> str:
    """The one line that stops the cold start before OPD: the numbers and the next step."""
    pattern, accuracy = gate["pattern"], gate["accuracy"]
    share = f"{pattern['value']:.2f} (needs ≥ {pattern['threshold']:.2f}, top-{Thresholds().pattern_k})"
    parts = [f"the student's overlap share with the teacher is {share}"]
    if pattern["passed"] and accuracy is not None:  # stopped because it solves nothing
        parts = [f"the student answers none of the {gate['prompts']} held-out prompts (before SFT "
                 f"{accuracy['student_before']:.2f}, teacher {accuracy['teacher']:.2f}) though "
                 f"its overlap share with the teacher is {share}: it learned the teacher's "
                 "answers, not the skill"]
    elif accuracy is not None:
        parts.append(f"held-out accuracy is {accuracy['student_after_sft']:.2f} (before SFT "
                     f"{accuracy['student_before']:.2f}, teacher {accuracy['teacher']:.2f}, "
                     f"{gate['prompts']} prompts)")
    return (f"cold start stopped before OPD: after SFT (step {sft.get('best_step')} of "
            f"{sft.get('steps')} run, cap {sft.get('cap')}) {'; '.join(parts)}; "
            f"next: {advice}, in a new --out (or delete OUT/sft and --resume, keeping the "
            "teacher data)")
