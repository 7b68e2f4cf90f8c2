"""The sampler's guarantees: a rollout depends only on its own seed, never on its batch."""

from __future__ import annotations

from itertools import accumulate

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


NUCLEUS_TOLERANCE = 1e-5
"""How far the sampler's float32 running mass may sit from the exact mass before a token (the
nucleus' edge is ambiguous within it)."""
UNIFORM_TOLERANCE = 1e-9
"""How far the sampler's float64 cumulative sum may sit from the exact edge of an interval."""


def brute_force_sample(logits: list[float], u: float, temperature: float,
                       top_p: float) -> set[int]:
    """The token whose cumulative-probability interval holds u, by the definitions: the softmax
    at the temperature (its weights at the sampler's float32 precision, so exact ties are the
    sampler's ties); the nucleus: the most likely tokens, ties to the lower id, until the mass
    before the next one exceeds top_p. Two tokens (either is right) only where u lies within
    `UNIFORM_TOLERANCE` of the edge between their intervals, or the mass before a token within
    `NUCLEUS_TOLERANCE` of top_p (the answer with and without it)."""
    scaled = torch.tensor([logits], dtype=torch.float32)
    if temperature != 1.0:
        scaled = scaled / temperature
    weights = (scaled - scaled.max()).exp()[0].tolist()
    probs = [w / sum(weights) for w in weights]
    order = list(range(len(logits)))
    sizes = [len(order)]
    if top_p < 1.0:
        order.sort(key=lambda i: (-weights[i], i))
        before = list(accumulate((probs[i] for i in order), initial=0.0))[:-1]
        sizes = range(sum(b <= top_p - NUCLEUS_TOLERANCE for b in before),
                      sum(b <= top_p + NUCLEUS_TOLERANCE for b in before) + 1)
    tokens = set()
    for size in sizes:
        nucleus = order[:size]
        kept = sum(probs[i] for i in nucleus)
        start = 0.0
        for i in nucleus:
            end = start + probs[i] / kept
            if start - UNIFORM_TOLERANCE <= u < end + UNIFORM_TOLERANCE:
                tokens.add(i)
            start = end
    return tokens


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-8, 8, width=32), min_size=2, max_size=12),
       st.floats(0, 1, exclude_max=True, width=32), st.sampled_from([0.5, 1.0, 2.0]),
       st.sampled_from([0.3, 0.9, 1.0]))
def test_sampling_picks_the_token_whose_interval_holds_the_uniform(logits, u, temperature, top_p):
    got = sample_next(torch.tensor([logits]), torch.tensor([u]), temperature, top_p).item()
    assert got in brute_force_sample(logits, float(torch.tensor(u)), temperature, top_p)


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
