"""The architecture matrix: opd is right on any Hugging Face causal LM, not only on Llama.

Tiny random models of ten architectures (tests/tiny_models.py), tied and untied embeddings,
one shared word-level tokenizer, every dropout field of each config set to 0.1:
- a student distilled from a byte-identical copy of itself shows the ideal measures at step 1
  (overlap 1, equal overlap masses, no entropy gap, no KL, no advantage), in training mode —
  which needs dropout off (GPT-2, OPT, Phi-3) and the layer drop and router jitter too (OPT,
  Mixtral);
- against another random model (the next architecture of the list) every metric is finite and
  only the student changes;
- the scoring path (backbone, then the output head by chunks, on left-padded rows) computes
  the log-probs of each row's own unpadded Hugging Face forward: learned positions (GPT-2,
  OPT's offset of 2), backbone attribute names (`transformer`, `model.decoder`), final-logit
  soft-capping (Gemma2).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from opd import metrics as M
from opd.config.training import build_config
from opd.models.loading import disable_dropout, original_config
from opd.run.loop import Trainer, run_training
from opd.step.scoring import output_head, response_states
from tests.conftest import make_tokenizer
from tests.tiny_models import ARCHITECTURES, DROPOUT, build_model, save_model

ARCHS = list(ARCHITECTURES)
TIED = pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
IDEAL = {M.OVERLAP_RATIO: 1.0, M.ENTROPY_GAP: 0.0, M.REVERSE_KL: 0.0,
         M.OVERLAP_TOKEN_ADVANTAGE: 0.0, M.LOSS: 0.0}
"""What a twin teacher must show at step 1 (within TOLERANCE); also equal overlap masses."""
TOLERANCE = 1e-5


def step_config(student, teacher, prompts, out, **overrides):
    settings = {"student": str(student), "teacher": str(teacher), "prompts": str(prompts),
                "out": str(out), "max_steps": 1, "prompts_per_step": 2,
                "samples_per_prompt": 2, "max_new_tokens": 8, "lr": 1e-3, "objective.k": 4,
                "measure_k": 4, "progress": False, **overrides}
    return build_config(settings)


def twin(tmp_path, arch, tied, **overrides):
    """Student and teacher folders holding the same saved model, byte for byte."""
    student = save_model(tmp_path / "student", arch, make_tokenizer(), seed=1, tied=tied,
                         **overrides)
    teacher = shutil.copytree(student, tmp_path / "teacher")
    return student, teacher


def assert_ideal(record, tolerance=TOLERANCE):
    for name, want in IDEAL.items():
        assert record[name] == pytest.approx(want, abs=tolerance), name
    assert record[M.OVERLAP_MASS_STUDENT] == pytest.approx(record[M.OVERLAP_MASS_TEACHER],
                                                           abs=tolerance)
    assert record[M.STUDENT_ENTROPY] == pytest.approx(record[M.TEACHER_ENTROPY], abs=tolerance)


@TIED
@pytest.mark.parametrize("arch", ARCHS)
def test_a_twin_teacher_gives_the_ideal_measures_at_step_one(arch, tied, sum_prompts, tmp_path):
    student, teacher = twin(tmp_path, arch, tied)
    run_training(step_config(student, teacher, sum_prompts, tmp_path / "run"))
    (record,) = M.read(tmp_path / "run")
    assert record[M.RESPONSE_LENGTH] > 1
    assert_ideal(record)
    # The checkpoint is the model with its own dropout settings, not the zeroed ones.
    saved = json.loads((tmp_path / "run/checkpoints/step-000001/config.json").read_text())
    original = json.loads((student / "config.json").read_text())
    assert {k: v for k, v in saved.items() if "drop" in k or "jitter" in k} == {
        k: v for k, v in original.items() if "drop" in k or "jitter" in k}


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_with_dropout_left_on_a_twin_is_not_ideal(arch, sum_prompts, tmp_path):
    """The issue as reported: GPT-2 and OPT configs enable dropout, so a student scored in
    training mode is not the policy that sampled; `disable_dropout: false` shows it."""
    student, teacher = twin(tmp_path, arch, True)
    run_training(step_config(student, teacher, sum_prompts, tmp_path / "run", disable_dropout=False))
    (record,) = M.read(tmp_path / "run")
    assert record[M.OVERLAP_RATIO] < 0.95
    assert record[M.ENTROPY_GAP] > 1e-4 and record[M.LOSS] != 0


@TIED
@pytest.mark.parametrize("arch", ARCHS)
def test_another_random_teacher_gives_finite_metrics_and_moves_only_the_student(
        arch, tied, sum_prompts, tmp_path):
    tokenizer = make_tokenizer()
    other = ARCHS[(ARCHS.index(arch) + 1) % len(ARCHS)]
    student = save_model(tmp_path / "student", arch, tokenizer, seed=1, tied=tied)
    teacher = save_model(tmp_path / "teacher", other, tokenizer, seed=2, tied=not tied)
    trainer = Trainer(step_config(student, teacher, sum_prompts, tmp_path / "run", lr=1e-2))
    models = trainer.models
    before = {name: {k: v.clone() for k, v in m.state_dict().items()}
              for name, m in (("student", models.student), ("teacher", models.teacher))}
    record = trainer.train_step(1)

    for name in (M.LOSS, M.GRAD_NORM, *M.TOKEN_MEASURES):
        assert math.isfinite(record[name]), name
    assert record[M.OVERLAP_RATIO] < 1 and record[M.REVERSE_KL] != 0
    assert record[M.GRAD_NORM] > 0 and record[M.SKIPPED_STEPS] == 0
    assert models.student.training and not models.teacher.training
    assert not any(p.requires_grad or p.grad is not None for p in models.teacher.parameters())
    teacher_after = models.teacher.state_dict()
    assert all(torch.equal(v, teacher_after[k]) for k, v in before["teacher"].items())
    student_after = models.student.state_dict()
    assert any(not torch.equal(v, student_after[k]) for k, v in before["student"].items())


@pytest.mark.parametrize("arch", ARCHS)
def test_scoring_left_padded_rows_gives_each_rows_own_forward(arch):
    """response_states + output_head on a left-padded batch, in training mode with dropout
    off, equal each row's unpadded Hugging Face forward in eval mode."""
    tokenizer = make_tokenizer()
    model = build_model(arch, tokenizer, seed=3, tied=False)
    disable_dropout(model)
    model.train()
    generator = torch.Generator().manual_seed(0)
    lengths, response = [5, 9, 3], 6
    rows = [torch.randint(4, len(tokenizer), (n + response,), generator=generator)
            for n in lengths]
    width = max(lengths) + response
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attention = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], attention[i, width - len(row):] = row, 1
    response_mask = torch.zeros_like(ids, dtype=torch.bool)
    response_mask[:, -response:] = True

    states = response_states(model, ids, attention, response_mask)
    got = output_head(model)(states.hidden).log_softmax(-1)
    got = got.gather(-1, states.targets[:, None]).squeeze(-1).view(len(rows), response)
    model.eval()
    with torch.no_grad():
        for i, row in enumerate(rows):
            logits = model(input_ids=row[None]).logits[0, -response - 1:-1].float()
            want = logits.log_softmax(-1).gather(-1, row[-response:, None]).squeeze(-1)
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_disable_dropout_makes_training_mode_compute_eval_mode(arch):
    tokenizer = make_tokenizer()
    model = build_model(arch, tokenizer, seed=4, tied=True)
    ids = torch.randint(4, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.eval()(input_ids=ids).logits
        noisy = model.train()(input_ids=ids).logits
        assert not torch.equal(noisy, reference)  # every matrix model has some train-time noise
        original = model.config.to_dict()
        changed = disable_dropout(model)
        assert changed and {name for _, name, _ in changed} <= set(original)
        assert all(value == DROPOUT for _, _, value in changed)
        for _ in range(2):
            torch.testing.assert_close(model(input_ids=ids).logits, reference, atol=0, rtol=0)
    with original_config(changed):
        assert model.config.to_dict() == original
    assert all(getattr(config, name) == 0 for config, name, _ in changed)


@pytest.mark.parametrize("run", ["grpo", "hybrid", "opd-lora", "dropout-kept"])
def test_every_on_policy_student_has_dropout_off_and_frozen_models_eval_mode(
        run, tiny_pair, tmp_path):
    """GRPO, hybrids (with a KL-to-reference) and LoRA students alike: in training mode the
    student computes what it computes in eval mode; teacher and reference are in eval mode."""
    student, teacher = twin(tmp_path, "gpt2", True)
    settings = {
        "grpo": {"distill_weight": 0.0, "outcome_weight": 1.0},
        "hybrid": {"outcome_weight": 0.5, "kl_penalty": 0.1},
        "opd-lora": {"lora_rank": 4},
        "dropout-kept": {"disable_dropout": False},
    }[run]
    trainer = Trainer(step_config(student, "" if run == "grpo" else teacher,
                                  tiny_pair["prompts"], tmp_path / "run", **settings))
    models = trainer.models
    ids = torch.randint(4, 32, (2, 10), generator=torch.Generator().manual_seed(2))
    assert models.student.training
    with torch.no_grad():
        noisy = models.student(input_ids=ids).logits
        models.student.eval()
        clean = models.student(input_ids=ids).logits
        models.student.train()
    assert torch.equal(noisy, clean) == (run != "dropout-kept")
    for frozen in (models.teacher, models.reference):
        assert frozen is None or not frozen.training
    assert (models.reference is None) == (run != "hybrid")
    assert math.isfinite(trainer.train_step(1)[M.LOSS])
