"""The cold start's checks on itself as pure functions: the held-out split, the data and curve
warnings, the next step the gate names, and its one line."""

from __future__ import annotations

from types import SimpleNamespace

from opd.recipes.gate import (
    MEMORISATION_RISE,
    accuracy_warning,
    data_warnings,
    gate_line,
    next_step,
    sft_warnings,
    split_prompts,
)
from opd.run.sft import SFTRun
from tests.conftest import make_tokenizer


def test_the_split_is_by_prompt_seeded_and_never_empties_a_side() -> None:
    train, held = split_prompts(100, 0.1, seed=0)
    assert len(held) == 10 and sorted(train + held) == list(range(100))
    assert split_prompts(100, 0.1, seed=0) == (train, held) != split_prompts(100, 0.1, seed=1)
    assert split_prompts(2, 0.5, seed=0)[0] and split_prompts(2, 0.5, seed=0)[1]
    assert split_prompts(3, 0.01, seed=0)[1]  # at least one held out
    assert split_prompts(1, 0.1, seed=0) == ([0], [])


def test_few_prompts_are_named_with_the_responses_length_and_variety() -> None:
    rows = [{"prompt_index": i % 4, "response": f"{i} + {i} = answer {i}"} for i in range(8)]
    [warning] = data_warnings(rows, {0, 1, 2}, min_prompts=10, tokenizer=make_tokenizer())
    assert warning.startswith("teacher data: only 3 distinct training prompts (fewer than "
                              "cold_start.min_prompts=10) for responses of 6 tokens")
    assert "2.0 distinct responses per prompt" in warning and "cold_start.prompts" in warning
    assert data_warnings(rows, {0, 1, 2}, min_prompts=3, tokenizer=make_tokenizer()) == []


def curve(train: list[float], validation: list[tuple[int, float]], stopped: bool) -> SFTRun:
    best = min(validation, key=lambda point: point[1])[0]
    return SFTRun(train, validation, best, stopped)


def test_memorisation_is_a_rising_validation_loss_under_a_falling_training_loss() -> None:
    train = [2.0 - 0.01 * step for step in range(100)]
    rising = curve(train, [(25, 1.0), (50, 0.8), (75, 0.9), (100, 1.1)], stopped=True)
    [warning] = sft_warnings(rising, cap=400, examples=200, batch_size=32)
    assert warning.startswith("sft: memorisation: the validation loss rose from 0.800 (step 50) "
                              "to 1.100 (step 100) while the training loss fell")
    assert "(8.0 epochs)" in warning and "cold_start.prompts" in warning
    flat = curve(train, [(25, 1.0), (50, 0.8), (75, 0.8 * (1 + MEMORISATION_RISE / 2))], True)
    assert sft_warnings(flat, cap=400, examples=200, batch_size=32) == []
    both_flat = curve([1.0] * 100, [(50, 0.8), (100, 1.0)], stopped=True)
    assert sft_warnings(both_flat, cap=400, examples=200, batch_size=32) == []


def test_a_cap_reached_while_improving_asks_for_more_steps() -> None:
    run = curve([1.0] * 100, [(50, 0.9), (100, 0.7)], stopped=False)
    [warning] = sft_warnings(run, cap=100, examples=200, batch_size=32)
    assert warning == ("sft: the validation loss was still improving at the cap of 100 steps "
                       "(0.700); raise cold_start.sft_steps")
    assert sft_warnings(SFTRun([1.0] * 10), cap=10, examples=5, batch_size=1) == []


def test_the_next_step_follows_the_evidence() -> None:
    cold = SimpleNamespace(sft_lr=1e-4)
    capped = {"stopped_early": False, "best_step": 200, "cap": 200}
    assert next_step(capped, [], cold).startswith("raise cold_start.sft_steps")
    stopped = {"stopped_early": True, "best_step": 50, "cap": 200}
    assert next_step(stopped, ["sft: memorisation: …"], cold).startswith(
        "give more distinct prompts with cold_start.prompts")
    assert next_step(stopped, [], cold).startswith("raise cold_start.sft_lr (now 0.0001)")


def test_the_stop_line_gives_the_numbers_and_the_next_step() -> None:
    gate = {"prompts": 40, "pattern": {"value": 0.312, "threshold": 0.5, "passed": False},
            "accuracy": {"student_after_sft": 0.0, "student_before": 0.09, "teacher": 1.0}}
    sft = {"best_step": 75, "steps": 175, "cap": 1000}
    line = gate_line(gate, sft, "raise cold_start.sft_lr (now 0.0001)")
    assert line == (
        "cold start stopped before OPD: after SFT (step 75 of 175 run, cap 1000) the student's "
        "overlap share with the teacher is 0.31 (needs ≥ 0.50, top-4); held-out accuracy is "
        "0.00 (before SFT 0.09, teacher 1.00, 40 prompts); next: raise cold_start.sft_lr "
        "(now 0.0001), in a new --out (or delete OUT/sft and --resume, keeping the teacher "
        "data)")


def test_a_fall_in_accuracy_is_said_beside_the_gate_not_a_stop() -> None:
    accuracy = {"student_before": 0.6, "student_after_sft": 0.2, "teacher": 1.0, "fell": True}
    [warning] = accuracy_warning({"prompts": 10, "accuracy": accuracy})
    assert warning == ("gate: the fine-tuning lowered held-out accuracy from 0.60 to 0.20 "
                       "(teacher 1.00, 10 prompts); OPD may lift it back, else give more "
                       "prompts with cold_start.prompts")
    assert accuracy_warning({"prompts": 10, "accuracy": accuracy | {"fell": False}}) == []
    assert accuracy_warning({"prompts": 10, "accuracy": None}) == []


def test_a_student_that_solves_nothing_held_out_is_stopped_with_that_reason() -> None:
    gate = {"prompts": 6, "pattern": {"value": 0.89, "threshold": 0.5, "passed": True},
            "accuracy": {"student_after_sft": 0.0, "student_before": 0.83, "teacher": 1.0,
                         "fell": True, "solves_none": True}}
    line = gate_line(gate, {"best_step": 100, "steps": 200, "cap": 1000}, "give more prompts")
    assert line == (
        "cold start stopped before OPD: after SFT (step 100 of 200 run, cap 1000) the student "
        "answers none of the 6 held-out prompts (before SFT 0.83, teacher 1.00) though its "
        "overlap share with the teacher is 0.89 (needs ≥ 0.50, top-4): it learned the "
        "teacher's answers, not the skill; next: give more prompts, in a new --out (or delete "
        "OUT/sft and --resume, keeping the teacher data)")
    assert accuracy_warning(gate) == []  # the stop line says it
