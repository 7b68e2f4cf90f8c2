"""Objectives against brute-force references on random distributions."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.config.training import ObjectiveConfig
from opd.errors import OPDError
from opd.step.distributions import shared_topk, topk_indices
from opd.step.objectives import (
    CANDIDATE_SETS,
    OBJECTIVES,
    WEIGHTINGS,
    aggregation_weights,
    constant_advantage,
    distillation_loss,
    group_advantages,
    reference_kl_penalty,
    shuffle_positions,
)
from tests.support import brute_topk, random_log_probs


def brute_candidates(p: list[float], q: list[float], k: int, strategy: str) -> set[int]:
    s, t = brute_topk(p, k), brute_topk(q, k)
    return {"student": s, "teacher": t, "intersection": s & t, "union": s | t,
            "symmetric-difference": s ^ t}[strategy]


def brute_topk_loss_and_grad(logits, teacher_lp, k, strategy, weighting):
    """Loss value and d loss / d logits, one position at a time with plain Python sets."""
    values, grads = [], []
    for row_logits, q in zip(logits, teacher_lp, strict=True):
        x = row_logits.clone().requires_grad_(True)
        lp = x.log_softmax(-1)
        c = sorted(brute_candidates(lp.tolist(), q.tolist(), k, strategy))
        if weighting == "student_p":
            w = {v: math.exp(lp[v].item()) for v in c}
        elif weighting == "teacher_p":
            w = {v: math.exp(q[v].item()) for v in c}
        else:
            w = {v: 1.0 for v in c}
        total = sum(w.values()) or 1.0
        loss = sum(-(w[v] / total) * (q[v].item() - lp[v].item()) * lp[v] for v in c)
        loss = loss if c else x.sum() * 0
        loss.backward()
        values.append(float(loss.detach()))
        grads.append(x.grad)
    return torch.tensor(values, dtype=torch.float64), torch.stack(grads)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), v=st.integers(1, 12),
       ks=st.lists(st.integers(1, 14), min_size=1, max_size=4), ties=st.booleans(),
       shared=st.booleans())
def test_topk_ids_are_the_brute_force_top_k(seed, v, ks, ties, shared):
    """Every k asked of one tensor, alone or remembered within `shared_topk` (where a smaller
    k reuses a larger one's top entries), with ties at the k-th place going to the lower id."""
    log_probs = random_log_probs(seed, 4, v, ties)
    with shared_topk() if shared else contextlib.nullcontext():
        for k in ks:
            ids = topk_indices(log_probs, k)
            assert ids.shape == (4, min(k, v))
            for row in range(4):
                assert set(ids[row].tolist()) == brute_topk(log_probs[row].tolist(), k)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    v=st.integers(2, 12),
    k=st.integers(1, 14),
    strategy=st.sampled_from(sorted(CANDIDATE_SETS)),
    weighting=st.sampled_from(sorted(WEIGHTINGS)),
    ties=st.booleans(),
)
def test_topk_loss_and_gradient_match_brute_force(seed, v, k, strategy, weighting, ties):
    logits = random_log_probs(seed, 3, v, ties)
    teacher = random_log_probs(seed + 1, 3, v, ties)
    config = ObjectiveConfig(name="topk", k=k, strategy=strategy, weighting=weighting)
    x = logits.clone().requires_grad_(True)
    loss = distillation_loss(x.log_softmax(-1), teacher, torch.zeros(3, dtype=torch.long), config)
    loss.sum().backward()
    want_loss, want_grad = brute_topk_loss_and_grad(logits, teacher, k, strategy, weighting)
    torch.testing.assert_close(loss.detach(), want_loss)
    torch.testing.assert_close(x.grad, want_grad)


@pytest.mark.parametrize("seed", range(5))
def test_topk_over_whole_vocabulary_has_the_full_reverse_kl_gradient(seed):
    v = 17
    logits = torch.randn(6, v, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    teacher = random_log_probs(seed + 100, 6, v)
    targets = torch.zeros(6, dtype=torch.long)
    grads = []
    for config in (ObjectiveConfig(name="topk", k=v), ObjectiveConfig(name="full_reverse_kl")):
        x = logits.clone().requires_grad_(True)
        distillation_loss(x.log_softmax(-1), teacher, targets, config).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_sampled_token_loss_in_expectation_has_the_exact_reverse_kl_gradient():
    # Over a 6-token vocabulary the expectation over ŷ ~ p is a sum weighted by p(ŷ) (the
    # sampling distribution, not differentiated); its gradient must be that of KL(p‖q) summed
    # by brute force over the vocabulary.
    v = 6
    logits = torch.randn(v, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    q = random_log_probs(4, 1, v)[0]
    x = logits.clone().requires_grad_(True)
    p = x.log_softmax(-1)
    per_token = OBJECTIVES["sampled"](p.expand(v, v), q.expand(v, v), torch.arange(v),
                                      ObjectiveConfig())
    (p.detach().exp() * per_token).sum().backward()
    y = logits.clone().requires_grad_(True)
    student = y.log_softmax(-1)
    sum(student[i].exp() * (student[i] - q[i]) for i in range(v)).backward()
    assert y.grad.abs().max() > 1e-3  # a real gradient, not two zeros
    torch.testing.assert_close(x.grad, y.grad)


def test_full_forward_subset_and_jsd_match_direct_formulas():
    p, q = random_log_probs(7, 4, 9), random_log_probs(8, 4, 9)
    t = torch.zeros(4, dtype=torch.long)
    rkl = (p.exp() * (p - q)).sum(-1)
    fkl = (q.exp() * (q - p)).sum(-1)
    torch.testing.assert_close(OBJECTIVES["full_reverse_kl"](p, q, t, ObjectiveConfig()), rkl)
    torch.testing.assert_close(OBJECTIVES["forward_kl"](p, q, t, ObjectiveConfig()), fkl)
    torch.testing.assert_close(OBJECTIVES["jsd"](p, q, t, ObjectiveConfig(beta=0.0)), fkl)
    torch.testing.assert_close(OBJECTIVES["jsd"](p, q, t, ObjectiveConfig(beta=1.0)), rkl)
    beta = 0.3
    m = torch.log((1 - beta) * p.exp() + beta * q.exp())
    jsd = beta * (q.exp() * (q - m)).sum(-1) + (1 - beta) * (p.exp() * (p - m)).sum(-1)
    torch.testing.assert_close(OBJECTIVES["jsd"](p, q, t, ObjectiveConfig(beta=beta)), jsd)
    # subset KL on the student's top-3, renormalised.
    config = ObjectiveConfig(name="subset_kl", k=3)
    got = OBJECTIVES["subset_kl"](p, q, t, config)
    for row in range(4):
        c = sorted(brute_topk(p[row].tolist(), 3))
        pb = p[row, c].exp() / p[row, c].exp().sum()
        qb = q[row, c].exp() / q[row, c].exp().sum()
        torch.testing.assert_close(got[row], (pb * (pb.log() - qb.log())).sum())


def test_k_larger_than_vocabulary_uses_the_whole_vocabulary():
    p, q = random_log_probs(1, 2, 5), random_log_probs(2, 2, 5)
    t = torch.zeros(2, dtype=torch.long)
    big = OBJECTIVES["subset_kl"](p, q, t, ObjectiveConfig(name="subset_kl", k=50))
    torch.testing.assert_close(big, (p.exp() * (p - q)).sum(-1))


def test_group_advantages_divide_by_the_population_std_of_each_group():
    # Group 0: mean 1/4, population std √(1/4 · 3/4) = √3/4, so +3/4 → √3 and −1/4 → −1/√3.
    # Group 1: mean 1, std 1. Group 2: all equal; group 3: one rollout; both have no signal.
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 1.0, 1.0, 1.0, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
    third = 1 / math.sqrt(3)
    want = torch.tensor([math.sqrt(3), -third, -third, -third, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, groups), want, rtol=1e-5, atol=0)


def test_aggregations_weight_tokens_and_sequences():
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    token = aggregation_weights(mask, "token-mean", total_tokens=4, total_sequences=2)
    torch.testing.assert_close(token.sum(), torch.tensor(1.0))
    seq = aggregation_weights(mask, "sequence-mean", total_tokens=4, total_sequences=2)
    torch.testing.assert_close(seq.sum(-1), torch.tensor([0.5, 0.5]))


def test_reference_penalty_is_zero_at_the_reference_and_positive_elsewhere():
    lp = torch.tensor([-1.0, -2.0])
    torch.testing.assert_close(reference_kl_penalty(lp, lp), torch.zeros(2))
    assert (reference_kl_penalty(lp, lp - 0.5) > 0).all()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"name": "kl"}, "objective.name must be one of"),
        ({"strategy": "both"}, "objective.strategy must be one of"),
        ({"weighting": "uniform"}, "objective.weighting must be one of"),
        ({"k": 0}, "objective.k must be at least 1, got 0"),
        ({"beta": 2.0}, r"objective.beta must lie in \[0, 1\], got 2.0"),
        ({"teacher_temperature": 0}, "objective.teacher_temperature must be positive"),
        ({"control": "zero"}, "objective.control must be one of"),
    ],
)
def test_bad_objective_settings_name_the_field(values, message):
    from opd.config.training import build_config

    with pytest.raises(OPDError, match=message):
        build_config({"objective": values})


# -- controls ---------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 9), v=st.integers(2, 8))
def test_constant_control_gives_every_token_the_mean_sampled_reward(seed, n, v):
    # Brute force: c = mean over positions of log q(ŷ) − log p(ŷ); the loss's gradient with
    # respect to each sampled token's log-prob is −c, and 0 for every other entry.
    p, q = random_log_probs(seed, n, v), random_log_probs(seed + 1, n, v)
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    c = sum(q[i, targets[i]].item() - p[i, targets[i]].item() for i in range(n)) / n
    assert constant_advantage(p, q, targets).item() == pytest.approx(c)
    x = p.clone().requires_grad_(True)
    config = ObjectiveConfig(control="constant")
    distillation_loss(x, q, targets, config).sum().backward()
    want = torch.zeros(n, v, dtype=p.dtype)
    for i in range(n):
        want[i, targets[i]] = -c
    torch.testing.assert_close(x.grad, want)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 9), v=st.integers(2, 8),
       name=st.sampled_from(["sampled", "topk", "full_reverse_kl"]))
def test_shuffled_control_is_the_objective_on_permuted_teacher_rows(seed, n, v, name):
    p, q = random_log_probs(seed, n, v), random_log_probs(seed + 1, n, v)
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    got = distillation_loss(p, q, targets, ObjectiveConfig(name=name, k=2, control="shuffled"))
    torch.manual_seed(seed)
    permutation = torch.randperm(n)
    assert sorted(permutation.tolist()) == list(range(n))  # a permutation of the positions
    shuffled = shuffle_positions(q, permutation)
    for i in range(n):  # row i is the real teacher's row at position permutation[i]
        torch.testing.assert_close(shuffled[i], q[permutation[i]])
    want = distillation_loss(p, shuffled, targets, ObjectiveConfig(name=name, k=2))
    torch.testing.assert_close(got, want)
    # The multiset of teacher rows is kept: the control changes where, not what.
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, q.tolist()))


def test_controls_refuse_a_teacher_with_another_vocabulary_or_a_served_one():
    from opd.config.training import build_config

    with pytest.raises(OPDError, match=r"objective\.control: .*cross_tokenizer_kl"):
        ObjectiveConfig(name="cross_tokenizer_kl", control="shuffled")
    with pytest.raises(OPDError, match=r"objective\.control: a served teacher"):
        build_config({"teacher": "http://localhost:8000", "objective": {"control": "constant"}})
