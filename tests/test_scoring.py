"""Chunked scoring equals one big chunk, and matches the model's own logits."""

from __future__ import annotations

import pytest
import torch

from opd.config.training import ObjectiveConfig
from opd.models.loading import load_model, load_tokenizer
from opd.step.measures import token_measures
from opd.step.objectives import TokenLoss
from opd.step.rollout import generate_rollouts
from opd.step.scoring import CHUNK_LOGITS, output_head, positions_per_chunk, response_states, score


@pytest.fixture(scope="module")
def scored(tiny_pair):
    tok = load_tokenizer(str(tiny_pair["student"]), "student")
    student = load_model(str(tiny_pair["student"]), "student", trainable=True)
    teacher = load_model(str(tiny_pair["teacher"]), "teacher", trainable=False)
    rollouts = generate_rollouts(student, tok, ["1 + 2 =", "3 + 4 + 5 ="], n=3,
                                 max_new_tokens=9, seed=3)
    return student, teacher, rollouts


def test_response_states_reproduce_the_models_log_probs(scored):
    student, _, r = scored
    states = response_states(student, r.input_ids, r.attention_mask, r.response_mask)
    lp = output_head(student)(states.hidden).log_softmax(-1)
    token_lp = lp.gather(-1, states.targets[:, None]).squeeze(-1)
    position_ids = (r.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = student(input_ids=r.input_ids, attention_mask=r.attention_mask,
                     position_ids=position_ids).logits
    full = logits[:, :-1].log_softmax(-1).gather(-1, r.input_ids[:, 1:, None]).squeeze(-1)
    want = full[r.response_mask[:, 1:]]
    torch.testing.assert_close(token_lp, want, atol=1e-5, rtol=1e-5)
    assert states.targets.tolist() == r.input_ids[:, 1:][r.response_mask[:, 1:]].tolist()
    assert states.positions.max() < r.response_lengths.max()


@pytest.mark.parametrize("objective", ["topk", "sampled", "full_reverse_kl", "jsd"])
def test_chunked_loss_gradient_and_measures_equal_unchunked(scored, objective):
    student, teacher, r = scored
    results = []
    for chunk in (4, 10_000):
        student.zero_grad()
        s = response_states(student, r.input_ids, r.attention_mask, r.response_mask)
        with torch.no_grad():
            t = response_states(teacher, r.input_ids, r.attention_mask, r.response_mask)
        m = s.hidden.shape[0]
        terms = TokenLoss(objective=ObjectiveConfig(name=objective, k=5),
                          weight=torch.full((m,), 1.0 / m),
                          advantage=torch.randn(m, generator=torch.Generator().manual_seed(0)))
        scores = score(
            s, t, student_head=output_head(student), teacher_head=output_head(teacher),
            loss=terms, measures=lambda sp, tp, y: token_measures(sp, tp, y, 5), chunk_size=chunk,
        )
        scores.loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in student.parameters()])
        results.append((scores.loss.detach(), scores.token_logprobs, scores.measures, grads))
    (l1, lp1, m1, g1), (l2, lp2, m2, g2) = results
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(lp1, lp2)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)
    assert set(m1) == set(m2) and len(m1) == 8
    for name in m1:
        torch.testing.assert_close(m1[name], m2[name], equal_nan=True)


def test_measures_without_a_loss_need_no_gradient(scored):
    """diagnose's use: the measures consumer alone, under no_grad, equals the training pass."""
    student, teacher, r = scored
    s = response_states(student, r.input_ids, r.attention_mask, r.response_mask)
    with torch.no_grad():
        t = response_states(teacher, r.input_ids, r.attention_mask, r.response_mask)
        alone = score(s, t, student_head=output_head(student), teacher_head=output_head(teacher),
                      measures=lambda sp, tp, y: token_measures(sp, tp, y, 5), chunk_size=7)
    assert alone.loss.item() == 0.0 and not alone.loss.requires_grad
    with_loss = score(s, t, student_head=output_head(student), teacher_head=output_head(teacher),
                      loss=TokenLoss(ObjectiveConfig(k=5), weight=torch.ones(s.targets.shape[0])),
                      measures=lambda sp, tp, y: token_measures(sp, tp, y, 5), chunk_size=7)
    assert with_loss.loss.requires_grad
    for name, value in alone.measures.items():
        torch.testing.assert_close(value, with_loss.measures[name], equal_nan=True)


@pytest.mark.parametrize("objective", ["topk", "full_reverse_kl", "sampled"])
def test_the_pass_gives_the_gradient_of_the_plain_unchunked_loss(scored, objective):
    """Each chunk differentiated as it is scored, its hidden-state gradient carried into the
    backbone afterwards, equals autograd through the whole loss at once."""
    from opd.step.objectives import distillation_loss

    student, teacher, r = scored
    config = ObjectiveConfig(name=objective, k=5)
    grads = []
    for chunked in (True, False):
        student.zero_grad()
        s = response_states(student, r.input_ids, r.attention_mask, r.response_mask)
        with torch.no_grad():
            t = response_states(teacher, r.input_ids, r.attention_mask, r.response_mask)
        m = s.hidden.shape[0]
        weight = torch.rand(m, generator=torch.Generator().manual_seed(1))
        if chunked:
            loss = score(s, t, student_head=output_head(student), teacher_head=output_head(teacher),
                         loss=TokenLoss(config, weight=weight), chunk_size=4).loss
        else:
            student_lp = output_head(student)(s.hidden).log_softmax(-1)
            teacher_lp = output_head(teacher)(t.hidden).log_softmax(-1).detach()
            loss = (weight * distillation_loss(student_lp, teacher_lp, s.targets, config)).sum()
        loss.backward()
        grads.append((loss.detach(), torch.cat([p.grad.reshape(-1) for p in student.parameters()])))
    (chunked_loss, chunked_grad), (plain_loss, plain_grad) = grads
    torch.testing.assert_close(chunked_loss, plain_loss)
    torch.testing.assert_close(chunked_grad, plain_grad, atol=1e-6, rtol=1e-5)
    assert plain_grad.abs().sum() > 0


def test_the_automatic_chunk_plan_bounds_a_chunks_logits():
    assert positions_per_chunk(7, 300) == 7  # an explicit chunk_size is kept
    assert positions_per_chunk(0, 152_064) == 256  # large vocabularies: the 256-position floor
    assert positions_per_chunk(0, 300) == CHUNK_LOGITS // 300  # small ones: few large chunks
    for vocab in (2, 300, 2_000, 32_000, 152_064, 10**7):
        positions = positions_per_chunk(0, vocab)
        assert positions >= 256
        assert positions == 256 or positions * vocab <= CHUNK_LOGITS
