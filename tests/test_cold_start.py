"""The cold-start recipe end to end on tiny models: three kept, resumable stages."""

from __future__ import annotations

import json

import pytest

from opd.errors import OPDError
from opd.recipes.cold_start import run_cold_start
from tests.conftest import make_tokenizer
from tests.test_train import tiny_config
from tests.tiny_models import DROPOUT, save_model

COLD = {"keep": "all", "samples_per_prompt": 2, "sft_steps": 3, "sft_batch_size": 4}


def test_cold_start_writes_each_stage_and_resumes(tiny_pair, tmp_path):
    out = tmp_path / "cold"
    config = tiny_config(tiny_pair, out, max_steps=2, cold_start=COLD)
    report = run_cold_start(config)
    rows = [json.loads(line) for line in (out / "teacher_data.jsonl").read_text().splitlines()]
    assert rows and {"messages", "response", "prompt_index"} <= set(rows[0])
    assert len({(r["prompt_index"], r["response"]) for r in rows}) == len(rows)  # deduplicated
    assert (out / "sft" / "config.json").exists()
    assert report["sft"]["steps"] == 3 and report["opd"]["steps"] == 2
    assert json.loads((out / "cold_start.json").read_text())["stages"]["sft"] == str(out / "sft")
    # A second call without --resume refuses; with it, finished stages are skipped.
    with pytest.raises(OPDError, match="already holds a cold-start run"):
        run_cold_start(config)
    before = (out / "teacher_data.jsonl").read_text()
    again = run_cold_start(tiny_config(tiny_pair, out, max_steps=3, cold_start=COLD), resume=True)
    assert (out / "teacher_data.jsonl").read_text() == before
    assert again["opd"]["steps"] == 3


def test_keep_correct_needs_answers(tiny_pair, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1 + 2 ="}\n')
    config = tiny_config(tiny_pair, tmp_path / "cold", prompts=str(prompts),
                         cold_start={"keep": "correct"})
    with pytest.raises(OPDError, match=r"row 1 has no 'answer'; cold_start\.keep=correct needs"):
        run_cold_start(config)


def test_the_fine_tuning_keeps_dropout_unless_told_and_the_saved_model_keeps_its_config(
        tiny_pair, tmp_path):
    """`cold_start.sft_dropout` (on by default, as SFT usually runs) decides the fine-tuning's
    dropout; the on-policy stage switches it off either way; sft/ keeps GPT-2's own 0.1."""
    student = save_model(tmp_path / "gpt2", "gpt2", make_tokenizer(), seed=1, tied=True)
    first_loss = {}
    for keep in (True, False):
        out = tmp_path / f"cold-{keep}"
        config = tiny_config(tiny_pair, out, student=str(student), max_steps=1,
                             cold_start={**COLD, "sft_dropout": keep})
        report = run_cold_start(config)
        first_loss[keep] = report["sft"]["first_loss"]
        saved = json.loads((out / "sft" / "config.json").read_text())
        assert saved["attn_pdrop"] == saved["resid_pdrop"] == saved["embd_pdrop"] == DROPOUT
    assert first_loss[True] != first_loss[False]
