"""Supervised fine-tuning: prompt tokens masked, EOS appended, loss goes down."""

from __future__ import annotations

import itertools

import pytest
import torch

from opd.data.prompts import render_prompt
from opd.lab.tokenizer import build_tokenizer
from opd.lab.world import sample_problems, sft_examples
from opd.lab.zoo import Size, build_model
from opd.run.optim import lr_multiplier
from opd.run.sft import (
    IGNORE_INDEX,
    EarlyStopping,
    SFTConfig,
    _encode,
    collate,
    fit_sft,
    train_sft,
    validation_loss,
)


def test_prompt_is_masked_and_eos_appended() -> None:
    tokenizer = build_tokenizer(1)
    record = sample_problems(1, digits=[2], skills=["carry"], seed=0)[0].record()
    messages = record.messages
    ids, labels = _encode(tokenizer, (messages, "answer 4 6"), SFTConfig())
    prompt = render_prompt(messages, tokenizer)
    prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert tokenizer.decode(ids[prompt_len:]) == "answer 4 6 <eos>"


def test_collate_pads_on_the_right() -> None:
    batch = collate([([5, 6, 7], [-100, 6, 7]), ([5, 6], [-100, 6])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 6, -100]]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_warms_up_then_decays(schedule: str) -> None:
    factors = [lr_multiplier(s, warmup_steps=10, total_steps=100, schedule=schedule,
                             min_ratio=0.1) for s in range(100)]
    assert factors[0] == 0.1 and factors[9] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert abs(factors[-1] - 0.1) < 0.02
    constant = [lr_multiplier(s, warmup_steps=2, total_steps=10, schedule="constant")
                for s in range(10)]
    assert constant == [0.5, 1.0] + [1.0] * 8


def test_training_lowers_the_loss_and_ignores_the_prompt() -> None:
    torch.set_num_threads(2)
    tokenizer = build_tokenizer(1)
    records = [p.record() for p in sample_problems(64, digits=[2], skills=["nocarry"], seed=0)]
    examples = sft_examples(records, "A", seed=0)
    model = build_model(Size(layers=1, hidden=32), tokenizer, seed=0)
    losses = train_sft(model, tokenizer, examples,
                       SFTConfig(steps=60, batch_size=16, lr=1e-2, warmup_steps=5, progress=False))
    assert len(losses) == 60 and not model.training
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5

    # Only the response words and the EOS are scored.
    _, labels = _encode(tokenizer, examples[0], SFTConfig())
    scored = sum(label != IGNORE_INDEX for label in labels)
    assert scored == len(examples[0][1].split()) + 1


def test_early_stopping_keeps_the_best_weights_and_stops_before_the_cap() -> None:
    """On easy data the validation loss flattens long before a generous cap: the fine-tuning
    stops after `patience` measurements without a 1% improvement, and the model it leaves
    has the best measured validation loss."""
    torch.set_num_threads(2)
    tokenizer = build_tokenizer(1)
    records = [p.record() for p in sample_problems(80, digits=[2], skills=["nocarry"], seed=0)]
    examples = sft_examples(records, "A", seed=0)
    model = build_model(Size(layers=1, hidden=32), tokenizer, seed=0)
    config = SFTConfig(steps=2000, batch_size=16, lr=1e-2, warmup_steps=5, progress=False)
    run = fit_sft(model, tokenizer, examples[:64], config, validation=examples[64:],
                  stopping=EarlyStopping(every=10, patience=3))
    assert run.stopped_early and run.steps < 2000 and not model.training
    assert [step for step, _ in run.validation] == list(range(10, run.steps + 1, 10))
    assert run.best_step == min(run.validation, key=lambda point: point[1])[0] < run.steps
    pad = tokenizer.pad_token_id
    encoded = [_encode(tokenizer, example, config) for example in examples[64:]]
    assert validation_loss(model, encoded, pad, 16) == pytest.approx(run.best_loss, rel=1e-5)


def test_without_validation_the_cap_is_the_step_count() -> None:
    tokenizer = build_tokenizer(1)
    records = [p.record() for p in sample_problems(8, digits=[1], skills=["nocarry"], seed=0)]
    model = build_model(Size(layers=1, hidden=16), tokenizer, seed=0)
    run = fit_sft(model, tokenizer, sft_examples(records, "A", seed=0),
                  SFTConfig(steps=7, batch_size=4, progress=False))
    assert run.steps == 7 and run.validation == [] and run.best_step is None
