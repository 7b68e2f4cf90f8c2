"""The sampler's guarantees: a rollout depends only on its own seed, never on its batch."""

from __future__ import annotations

import torch

from opd.models import load_model, load_tokenizer
from opd.rollout import RolloutNoise, generate_rollouts

PROMPTS = ["1 + 2 =", "3 + 4 + 5 =", "a b c", "7 =", "1 1 1 1 1 1"]


def test_block_noise_is_the_per_step_stream_of_each_rollout():
    seeds = [3, 11, 42]
    noise = RolloutNoise([torch.Generator().manual_seed(s) for s in seeds], max_steps=50)
    noise.BLOCK_ELEMENTS = 7 * 31  # force several blocks of 7 steps
    drawn = torch.stack([noise.next(31, torch.device("cpu")) for _ in range(20)])  # [T, B, V]
    for row, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        uniform = torch.stack([torch.rand(31, generator=generator) for _ in range(20)])
        assert torch.equal(drawn[:, row], -torch.log(-torch.log(uniform.clamp(1e-20, 1.0))))


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
