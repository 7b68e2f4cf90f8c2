"""Gemma-3-270M base: a 262,144-token vocabulary and no chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import opd
from opd import metrics as M
from opd.data.prompts import render_prompt
from opd.models.gguf import converted_folder
from opd.models.loading import load_tokenizer

PROMPT = "What is 12 + 35?"


@pytest.fixture(scope="module")
def gemma(gemma_gguf) -> Path:
    return Path(converted_folder(str(gemma_gguf), "teacher"))


def test_it_loads_with_its_whole_vocabulary(gemma):
    config = json.loads((gemma / "config.json").read_text())
    assert config["model_type"].startswith("gemma3") and config["vocab_size"] == 262144
    assert "quantization_config" not in config


def test_a_prompt_renders_without_a_chat_template(gemma):
    tokenizer = load_tokenizer(str(gemma), "teacher")
    assert not tokenizer.chat_template
    assert render_prompt([{"role": "user", "content": PROMPT}], tokenizer) == PROMPT


def test_its_head_runs_chunked_and_a_twin_is_ideal(gemma, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT, "answer": "47"}) + "\n")
    result = opd.train(student=str(gemma), teacher=str(gemma), prompts=str(prompts),
                       out=str(tmp_path / "run"), max_steps=1, prompts_per_step=1,
                       samples_per_prompt=2, max_new_tokens=8, max_prompt_tokens=32,
                       chunk_size=4, eval_every=0, progress=False,
                       **{"objective.k": 8, "measure_k": 8})
    (record,) = result.metrics()
    assert record[M.OVERLAP_RATIO] == pytest.approx(1.0, abs=1e-4)
    assert record[M.REVERSE_KL] == pytest.approx(0.0, abs=1e-4)
