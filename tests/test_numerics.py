"""Numerics in bfloat16, on every architecture of the matrix (tests/tiny_models.py).

The output head returns float32 logits (soft-capping applied in float32) and the log-softmax
runs in float32; only the matmul of the head is in the model's dtype. Pinned here:
- a twin teacher gives the ideal measures in bfloat16 too (within 1e-5);
- on the same models and tokens, the bfloat16 step means of every measure are within
  STEP_MEAN_TOLERANCE of the float32 ones, and each token's log-prob within TOKEN_TOLERANCE;
- given the same bfloat16 hidden states, the head's log-probs are within HEAD_TOLERANCE of
  exact arithmetic, while a log-softmax taken in bfloat16 (a head returning bfloat16 logits)
  drifts by more (~0.03 nats at log-probs around -8).
The output heads are scaled ×10 so that the log-probs span about -8…0, as a trained model's
do; a random tiny model's are all near -log V.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from opd import metrics as M
from opd.run.loop import run_training
from opd.step.measures import token_measures
from opd.step.scoring import output_head, response_states, score
from tests.conftest import make_tokenizer
from tests.support import ARCHS, assert_ideal, step_config
from tests.tiny_models import build_model, save_model

STEP_MEAN_TOLERANCE = 0.01
"""|bf16 − fp32| of the step mean of each token measure (nats or fraction); measured ≤ 0.003."""
TOKEN_TOLERANCE = 0.1
"""|bf16 − fp32| of each response token's log-prob (nats); measured ≤ 0.052 (Gemma2)."""
HEAD_TOLERANCE = 0.02
"""|head − exact| of the log-probs on the same bf16 states (nats); measured ≤ 0.016 (the
rounding of the bf16 logits), while a bf16 log-softmax is off by 0.027–0.039."""


def scaled_pair(arch):
    tokenizer = make_tokenizer()
    cap = {"final_logit_softcapping": 30.0} if arch == "gemma2" else {}  # Gemma2's own cap
    models = [build_model(arch, tokenizer, seed=seed, tied=False, **cap) for seed in (1, 2)]
    with torch.no_grad():
        for model in models:
            model.get_output_embeddings().weight.mul_(10)
    return tokenizer, models


def rows(tokenizer):
    ids = torch.randint(4, len(tokenizer), (8, 40), generator=torch.Generator().manual_seed(0))
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, 8:] = True
    return ids, torch.ones_like(ids), response


@pytest.mark.parametrize("arch", ARCHS)
def test_a_twin_teacher_is_ideal_in_bfloat16(arch, sum_prompts, tmp_path):
    student = save_model(tmp_path / "student", arch, make_tokenizer(), seed=1, tied=True)
    teacher = shutil.copytree(student, tmp_path / "teacher")
    config = step_config(student, teacher, sum_prompts, tmp_path / "run", dtype="bfloat16")
    run_training(config)
    (record,) = M.read(tmp_path / "run")
    assert_ideal(record)


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_measures_match_float32_on_the_same_models(arch):
    tokenizer, (student, teacher) = scaled_pair(arch)
    ids, attention, response = rows(tokenizer)
    scores = {}
    for dtype in (torch.float32, torch.bfloat16):
        s, t = (copy.deepcopy(m).to(dtype).eval() for m in (student, teacher))
        with torch.no_grad():
            states = response_states(s, ids, attention, response)
            head = output_head(s)
            assert head(states.hidden[:3]).dtype == torch.float32
            scores[dtype] = score(
                states, response_states(t, ids, attention, response), student_head=head,
                teacher_head=output_head(t), chunk_size=64,
                measures=lambda a, b, y: token_measures(a, b, y, 4))
    full, half = scores[torch.float32], scores[torch.bfloat16]
    assert half.token_logprobs.dtype == torch.float32
    assert full.token_logprobs.min() < -6  # log-probs as wide as a trained model's
    torch.testing.assert_close(half.token_logprobs, full.token_logprobs, atol=TOKEN_TOLERANCE,
                               rtol=0)
    for name, values in full.measures.items():
        assert half.measures[name].dtype == torch.float32
        gap = abs(float(half.measures[name].nanmean()) - float(values.nanmean()))
        assert gap <= STEP_MEAN_TOLERANCE, name


@pytest.mark.parametrize("arch", ARCHS)
def test_the_head_keeps_bfloat16_states_to_float32_log_probs(arch):
    tokenizer, (student, _) = scaled_pair(arch)
    model = student.to(torch.bfloat16).eval()
    ids, attention, response = rows(tokenizer)
    with torch.no_grad():
        hidden = response_states(model, ids, attention, response).hidden
        raw = model.get_output_embeddings()(hidden)
        exact = raw.double()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            exact, raw = torch.tanh(exact / cap) * cap, torch.tanh(raw / cap) * cap
        exact = exact.log_softmax(-1)
        ours = output_head(model)(hidden).log_softmax(-1)
        in_bfloat16 = raw.log_softmax(-1)
    assert ours.dtype == torch.float32 and in_bfloat16.dtype == torch.bfloat16
    ours_error = float((ours.double() - exact).abs().max())
    bf16_error = float((in_bfloat16.double() - exact).abs().max())
    assert ours_error <= HEAD_TOLERANCE < bf16_error
