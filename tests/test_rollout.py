"""The sampler's guarantees: a rollout depends only on its own seed, never on its batch."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.models.loading import load_model, load_tokenizer
from opd.step.rollout import generate_rollouts, inverse_cdf, rollout_uniforms, sample_next

PROMPTS = ["1 + 2 =", "3 + 4 + 5 =", "a b c", "7 =", "1 1 1 1 1 1"]


def test_each_rollout_draws_its_own_stream_one_uniform_per_token():
    seeds = [3, 11, 42]
    drawn = rollout_uniforms([torch.Generator().manual_seed(s) for s in seeds], 20,
                             torch.device("cpu"))
    for row, seed in enumerate(seeds):
        assert torch.equal(drawn[row], torch.rand(20, generator=torch.Generator().manual_seed(seed)))


def brute_force_sample(logits: list[float], u: float, temperature: float,
                       top_p: float) -> tuple[int, float]:
    """The token whose cumulative-probability interval holds u, by the definitions (softmax at
    the temperature; the nucleus: the most likely tokens, ties to the lower id, until the mass
    before the next one exceeds top_p), and how near u, that mass or the nucleus' ranking came
    to an edge."""
    weights = [math.exp((x - max(logits)) / temperature) for x in logits]
    probs = [w / sum(weights) for w in weights]
    order = list(range(len(logits)))
    edges = [1.0]
    if top_p < 1.0:
        order.sort(key=lambda i: (-probs[i], i))
        before = [sum(probs[j] for j in order[:n]) for n in range(len(order))]
        edges = [abs(b - top_p) for b in before]
        edges += [b - a for a, b in pairwise(sorted(probs)) if b > a]  # near ties
        order = [i for i, b in zip(order, before, strict=True) if b <= top_p]
    kept = sum(probs[i] for i in order)
    running = 0.0
    for i in order:
        running += probs[i] / kept
        edges.append(abs(u - running))
        if u < running:
            return i, min(edges)
    raise AssertionError("u must lie in [0, 1)")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-8, 8, width=32), min_size=2, max_size=12),
       st.floats(0, 1, exclude_max=True, width=32), st.sampled_from([0.5, 1.0, 2.0]),
       st.sampled_from([0.3, 0.9, 1.0]))
def test_sampling_picks_the_token_whose_interval_holds_the_uniform(logits, u, temperature, top_p):
    got = sample_next(torch.tensor([logits]), torch.tensor([u]), temperature, top_p).item()
    want, margin = brute_force_sample(logits, float(torch.tensor(u)), temperature, top_p)
    assert got == want or margin < 1e-5  # float32 weights may round across an edge


@pytest.mark.parametrize("vocab", [1025, 32_000, 50_001])
def test_the_two_level_search_finds_the_index_of_one_cumulative_sum(vocab):
    generator = torch.Generator().manual_seed(vocab)
    weights = (torch.randn(64, vocab, generator=generator) * 3).exp()
    weights[:, vocab // 2:] *= torch.rand(64, 1, generator=generator) < 0.5  # zero tails
    for _ in range(20):
        uniform = torch.rand(64, generator=generator)
        cumulative = weights.double().cumsum(-1)
        want = torch.searchsorted(cumulative, (uniform.double() * cumulative[:, -1])[:, None],
                                  right=True)[:, 0]
        assert torch.equal(inverse_cdf(weights, uniform), want)


def test_sampled_frequencies_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).expand(40_000, 5)
    uniforms = torch.rand(40_000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(sample_next(logits, uniforms, 1.0, 1.0), minlength=5)
    expected = logits[0].softmax(-1) * 40_000
    assert counts[4] == 0  # e^-32 of the mass
    assert ((counts[:4] - expected[:4]).abs() < 4 * expected[:4].sqrt()).all()
    nucleus = torch.bincount(sample_next(logits, uniforms, 1.0, 0.7), minlength=5)
    assert nucleus[2:].sum() == 0  # p = .64, .24, ...: the two most likely hold 0.7
    assert abs(nucleus[0] / 40_000 - 0.644 / (0.644 + 0.237)) < 0.01


def test_a_rollout_is_the_same_alone_in_any_batch(tiny_pair):
    tokenizer = load_tokenizer(str(tiny_pair["student"]), "student")
    model = load_model(str(tiny_pair["student"]), "student", trainable=False)
    options = dict(n=3, max_new_tokens=12, temperature=1.0, seed=5)
    together = generate_rollouts(model, tokenizer, PROMPTS, **options)
    split = generate_rollouts(model, tokenizer, PROMPTS, batch_size=4, **options)
    assert together.response_ids == split.response_ids
    for i, prompt in enumerate(PROMPTS):  # alone, under its id in the full list
        alone = generate_rollouts(model, tokenizer, [prompt], prompt_ids=[i], **options)
        assert alone.response_ids == together.response_ids[3 * i : 3 * i + 3]
    nucleus = dict(options, top_p=0.8)
    assert (generate_rollouts(model, tokenizer, PROMPTS, **nucleus).response_ids
            == generate_rollouts(model, tokenizer, PROMPTS, batch_size=2, **nucleus).response_ids)
