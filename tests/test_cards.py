"""Model cards: every checkpoint and the final model folder carry a README.md in the Hugging
Face model-card format that names what was trained from what, how, and how well."""

from __future__ import annotations

import json

import pytest
import torch

import opd
from opd import metrics as M
from opd.config.training import build_config
from opd.run.cards import CARD_FILE, TRAINING_STATE, model_card, read_card
from opd.run.folder import (
    IN_FLIGHT_FILE,
    MANIFEST_FILE,
    RNG_FILE,
    SETTINGS_FILE,
    SHARDED_OPTIMIZER,
    STATE_FILE,
    RunFolder,
    checkpoint_problem,
)


@pytest.fixture(scope="module")
def run(tiny_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("cards") / "run"
    return opd.train(student=str(tiny_pair["student"]), teacher=str(tiny_pair["teacher"]),
                     prompts=str(tiny_pair["prompts"]), eval_prompts=str(tiny_pair["prompts"]),
                     out=str(out), max_steps=4, save_every=2, prompts_per_step=2,
                     samples_per_prompt=2, max_new_tokens=6, lr=1e-3, eval_every=2,
                     eval_temperature=0.0, objective={"k": 4}, measure_k=4, progress=False)


def test_every_checkpoint_has_a_card_naming_its_run(run, tiny_pair):
    records = {r[M.STEP]: r for r in run.metrics()}
    checkpoints = RunFolder(run.run).complete_checkpoints()
    assert [c.name for c in checkpoints] == ["step-000002", "step-000004"]
    for checkpoint in checkpoints:
        # The card is written before the manifest, which lists it: the checkpoint stays complete.
        assert CARD_FILE in json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
        assert checkpoint_problem(checkpoint) is None
        meta, body = read_card(checkpoint)
        step = int(checkpoint.name.split("-")[1])
        assert meta["base_model"] == str(tiny_pair["student"])
        assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
        assert {"opd", "on-policy-distillation", "objective-topk"} <= set(meta["tags"])
        assert f"checkpoint at step {step}" in body
        assert f"| teacher | `{tiny_pair['teacher']}` |" in body
        assert "`topk` (k=4, strategy student, weighting student_p)" in body
        assert f"| steps | {step} of 4 " in body and str(tiny_pair["prompts"]) in body
        assert f"| opd version | {opd.__version__} |" in body
        assert f"| loss | {records[step][M.LOSS]:.4g} |" in body
        assert f"{records[step][M.ACCURACY]:.4g} at the latest evaluation" in body


def test_the_final_model_folder_is_a_loadable_hf_model_with_the_final_card(run):
    from transformers import AutoModelForCausalLM

    assert run.model == run.run / "model"
    files = {p.name for p in run.model.iterdir()}
    assert {"config.json", "README.md", "tokenizer.json"} <= files
    assert not files & {"optimizer.pt", "scheduler.pt", "rng.json", "trainer_state.json",
                        "run_config.yaml", "manifest.json"}
    meta, body = read_card(run.model)
    assert meta["base_model"] == run.config.student and "final model" in body
    assert f"{run.initial_accuracy:.4g} before training, {run.final_accuracy:.4g}" in body
    assert f"| overlap_ratio | {run.final_measures[M.OVERLAP_RATIO]:.4g} |" in body
    final = AutoModelForCausalLM.from_pretrained(run.model)
    last = AutoModelForCausalLM.from_pretrained(run.final_checkpoint)
    for a, b in zip(final.parameters(), last.parameters(), strict=True):
        assert torch.equal(a, b)
    assert run.summary["final_model"] == str(run.model)


def test_the_model_export_leaves_out_every_training_state_file_and_nothing_else():
    assert {"optimizer.pt", SHARDED_OPTIMIZER, "scheduler.pt", RNG_FILE, STATE_FILE,
            SETTINGS_FILE, MANIFEST_FILE, CARD_FILE, IN_FLIGHT_FILE} == TRAINING_STATE


def test_cards_of_grpo_lora_and_hub_prompts():
    config = build_config({"student": "org/base-model", "prompts": "org/math-prompts", "lora_rank": 8,
                           "distill_weight": 0, "outcome_weight": 1, "samples_per_prompt": 2,
                           "verifier": "math", "split": "test"})
    text = model_card(config, step=7, record={M.STEP: 7, M.TRAIN_REWARD: 0.5})
    assert text.startswith("---\n")
    meta = __import__("yaml").safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "org/base-model" and meta["library_name"] == "peft"
    assert {"opd", "grpo", "lora"} <= set(meta["tags"]) and meta["datasets"] == ["org/math-prompts"]
    assert "| teacher | none |" in text and "(split test)" in text and "verifier math" in text
    assert "| train_reward | 0.5 |" in text and "AutoPeftModelForCausalLM" in text
