"""Student rollouts: sample n responses per prompt with a KV cache.

Every rollout draws its randomness from its own generator, seeded by (seed, prompt id,
rollout index). A rollout is therefore the same whether its prompt is generated alone, in
another batch, or on another process: resumed and multi-process runs see the very same
samples as a single uninterrupted run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from opd.data.prompts import PromptRecord, render_prompt
from opd.errors import OPDError
from opd.runtime import is_wrapped

MIX = 0x9E3779B97F4A7C15


@dataclass
class Rollouts:
    """Prompt + response token rows, left-padded prompts and right-padded responses.

    Shapes: `input_ids`, `attention_mask`, `response_mask` are [N, P + R]; `response_mask`
    is True on the response tokens that count (up to and including EOS).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_index: torch.Tensor  # [N] index into the prompt list given
    truncated: torch.Tensor  # [N] bool: no EOS before max_new_tokens
    response_ids: list[list[int]]
    texts: list[str]
    sampled_logprobs: list[list[float]] | None = None
    """The sampling engine's log-prob of each response token (vLLM's), per rollout; None
    from opd's own sampler, whose log-probs are the trainer's."""

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)


def rollout_seed(seed: int, prompt_id: int, rollout: int) -> int:
    """A well-mixed 63-bit seed for one rollout."""
    value = (seed * MIX + prompt_id * 0xBF58476D1CE4E5B9 + rollout * 0x94D049BB133111EB) & (
        (1 << 64) - 1
    )
    value ^= value >> 31
    return value & ((1 << 63) - 1)


def rollout_uniforms(generators: Sequence[torch.Generator], steps: int,
                     device: torch.device) -> torch.Tensor:
    """[rows, steps] uniforms in [0, 1): each rollout's one number per token, from its own
    generator, so a rollout's samples do not depend on the others in its batch."""
    return torch.stack([torch.rand(steps, generator=g, device=g.device) for g in generators]).to(device)


def sample_next(logits: torch.Tensor, uniform: torch.Tensor, temperature: float,
                top_p: float) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else the token at which the cumulative
    probability of the (nucleus) distribution first exceeds the row's `uniform` [rows].

    One uniform per token instead of a noise value per vocabulary entry (Gumbel-max, whose
    noise took a third of a rollout at a 32k vocabulary). The cumulative sum runs in float64, so
    the tail of a large vocabulary keeps its probability.
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    weights = (logits - logits.max(-1, keepdim=True).values).exp()
    order = None
    if top_p < 1.0:
        weights, order = weights.sort(stable=True, dim=-1, descending=True)  # ties: lower id first
        probs = weights / weights.sum(-1, keepdim=True)
        weights = weights.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)
    token = inverse_cdf(weights, uniform)
    return token if order is None else order.gather(-1, token[:, None])[:, 0]


CDF_BLOCK = 256
"""Vocabulary entries per block of `inverse_cdf`'s two-level search."""


def inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row of `weights` [rows, V] (≥ 0, not normalised), the first index whose cumulative
    weight exceeds `uniform` × the total, summed in float64. A large vocabulary is searched in
    two levels, the sums of blocks of `CDF_BLOCK` entries and then the entries of one block,
    which gives the same index as one float64 cumulative sum over the row at a ninth of its
    cost (32k entries)."""
    rows, vocab = weights.shape
    if vocab <= 4 * CDF_BLOCK:
        cumulative = weights.double().cumsum(-1)
        point = uniform.to(cumulative) * cumulative[:, -1]
        return torch.searchsorted(cumulative, point[:, None], right=True)[:, 0]
    blocks = -(-vocab // CDF_BLOCK)
    padded = F.pad(weights, (0, blocks * CDF_BLOCK - vocab)).view(rows, blocks, CDF_BLOCK)
    block_cdf = padded.sum(-1, dtype=torch.float64).cumsum(-1)
    point = uniform.to(block_cdf) * block_cdf[:, -1]
    block = torch.searchsorted(block_cdf, point[:, None], right=True)  # [rows, 1]
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)
    inside = padded.gather(1, block[:, :, None].expand(-1, -1, CDF_BLOCK))[:, 0].double().cumsum(-1)
    offset = torch.searchsorted(inside, point[:, None] - before, right=True)[:, 0]
    # A block's sum and the last of its cumulative sums can round an ulp apart, which can put
    # the point just past the block's end (past the vocabulary, in the padded last block).
    return (block[:, 0] * CDF_BLOCK + offset).clamp_(max=vocab - 1)


def _forward_options(model: torch.nn.Module, cache: DynamicCache) -> dict:
    """Keyword arguments for a cached forward, across transformers versions."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    params = inspect.signature(base.forward).parameters
    options = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    if "logits_to_keep" in params:
        options["logits_to_keep"] = 1
    return options


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids.view(len(rows), width), mask.view(len(rows), width)


def pack(
    prompt_rows: Sequence[Sequence[int]], response_rows: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, P + R] ids, attention mask and response mask from ragged prompts and responses."""
    prompt_ids, prompt_mask = left_pad(prompt_rows, pad_id)
    width = max((len(r) for r in response_rows), default=0)
    resp = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in response_rows],
                        dtype=torch.long).view(len(response_rows), width)
    resp_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in response_rows],
                             dtype=torch.long).view(len(response_rows), width)
    input_ids = torch.cat([prompt_ids, resp], dim=1)
    attention = torch.cat([prompt_mask, resp_mask], dim=1)
    response_mask = torch.cat([torch.zeros_like(prompt_mask), resp_mask], dim=1).bool()
    return input_ids, attention, response_mask


def _sample_batch(
    model: torch.nn.Module,
    prompt_rows: list[list[int]],
    generators: list[torch.Generator],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: set[int],
    pad_id: int,
    on_step: Callable[[int], None] | None = None,
) -> list[list[int]]:
    device = next(model.parameters()).device
    ids, mask = left_pad(prompt_rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    options = _forward_options(model, DynamicCache())
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position, **options).logits[:, -1]
    eos = torch.tensor(sorted(eos_ids), device=device)
    finished = torch.zeros(len(prompt_rows), dtype=torch.bool, device=device)
    uniforms = rollout_uniforms(generators, max_new_tokens, device)
    tokens: list[torch.Tensor] = []
    next_position = position[:, -1:] + 1
    for step in range(max_new_tokens):
        token = sample_next(logits, uniforms[:, step], temperature, top_p)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        finished |= torch.isin(token, eos)
        if on_step is not None:
            on_step(len(prompt_rows))
        if len(tokens) == max_new_tokens or bool(finished.all()):  # no logits needed after
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(
            input_ids=token[:, None], attention_mask=mask, position_ids=next_position, **options
        ).logits[:, -1]
        next_position = next_position + 1
    generated = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in prompt_rows]
    responses = []
    for row in generated:
        cut = next((i for i, t in enumerate(row) if t in eos_ids), None)
        responses.append(row if cut is None else row[: cut + 1])
    return responses


def stop_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """The tokens that end a response: the tokenizer's EOS and every EOS id of the model's
    generation config (chat models often end a turn with a token other than the tokenizer's
    EOS: Gemma's `<end_of_turn>`, Llama-3's `<|eot_id|>`, listed there beside it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return eos_token_ids(tokenizer, getattr(base, "generation_config", None))


def eos_token_ids(tokenizer, generation: Any) -> set[int]:
    """`stop_token_ids` from a tokenizer and a generation config (None: the tokenizer's EOS
    only), for a model that is not loaded in this process (a vLLM teacher)."""
    listed = getattr(generation, "eos_token_id", None)
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    return {i for i in [tokenizer.eos_token_id, *listed] if i is not None}


def encode_prompts(tokenizer, texts: Sequence[str], max_prompt_tokens: int | None = None):
    """Token ids of rendered prompts, BOS first when the tokenizer has one, at most
    `max_prompt_tokens` (the last ones) each."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    bos = tokenizer.bos_token_id
    if bos is not None:
        encoded = [e if e[:1] == [bos] else [bos, *e] for e in encoded]
    if max_prompt_tokens is not None:
        encoded = [e[-max_prompt_tokens:] for e in encoded]
    return encoded


def check_prompts(records: Sequence[PromptRecord], tokenizer, template: str | None, *, who: str,
                  limit: int | None = None, limit_name: str = "", fix: str = "",
                  chat_template_kwargs: dict | None = None) -> None:
    """Render every prompt as `who` (e.g. "the student's tokenizer") will see it, and, with a
    `limit`, check that it fits: the first row that cannot be rendered, or is longer than
    `limit` tokens, is named with the fix. Longer prompts are refused rather than cut."""
    texts = []
    for record in records:
        try:
            texts.append(render_prompt(record.messages, tokenizer, template, chat_template_kwargs))
        except OPDError as err:
            raise OPDError(f"{record.source or 'prompts'}: with {who}, {err}") from None
    if limit is None or not texts:
        return
    for start in range(0, len(texts), 1024):
        chunk = slice(start, start + 1024)
        for record, ids in zip(records[chunk], encode_prompts(tokenizer, texts[chunk]), strict=True):
            if len(ids) > limit:
                raise OPDError(f"{record.source or 'prompts'}: the prompt is {len(ids)} tokens "
                               f"with {who}, more than {limit_name} ({limit}); {fix}")


def prompt_token_rows(tokenizer, prompts: Sequence[str] | Sequence[list[int]],
                      max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each prompt: rendered texts are encoded, id rows kept as they are; at most
    `max_prompt_tokens` (the last ones) each."""
    if all(isinstance(p, str) for p in prompts):
        return encode_prompts(tokenizer, prompts, max_prompt_tokens)
    return [list(p)[-max_prompt_tokens:] if max_prompt_tokens else list(p) for p in prompts]


def pad_token_id(tokenizer) -> int:
    """The id that pads rollout rows: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def generate_rollouts(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str] | Sequence[list[int]],
    *,
    n: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    prompt_ids: Sequence[int] | None = None,
    batch_size: int | None = None,
    max_prompt_tokens: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Rollouts:
    """Sample `n` responses for each prompt: a rendered prompt text, or token ids as they
    are (e.g. a prompt followed by the first tokens of another model's response).
    `on_step(rows)` is called after every decode step of a batch of `rows` (progress bars).

    `prompt_ids` are stable ids for seeding (default: positions in `prompts`); a prompt longer
    than `max_prompt_tokens` keeps its last tokens (the verbs refuse such prompts up front with
    `check_prompts`, so this only guards callers that did not check).
    """
    was_training = model.training
    model.eval()
    prompt_ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
    encoded = prompt_token_rows(tokenizer, prompts, max_prompt_tokens)
    pad_id = pad_token_id(tokenizer)
    eos_ids = stop_token_ids(model, tokenizer)
    rows = [(i, r) for i in range(len(prompts)) for r in range(n)]
    batch_size = batch_size or len(rows)
    device = next(model.parameters()).device
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    responses: list[list[int]] = []
    # inference_mode skips autograd's bookkeeping (~8% of a decode step of a small model); a
    # model wrapped for several processes unshards with version counters, which inference
    # tensors lack, so it decodes under no_grad.
    decoding = torch.no_grad if is_wrapped(model) else torch.inference_mode
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        generators = [
            torch.Generator(device=gen_device).manual_seed(rollout_seed(seed, prompt_ids[i], r))
            for i, r in chunk
        ]
        with decoding():
            responses += _sample_batch(
                model, [encoded[i] for i, _ in chunk], generators,
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                eos_ids=eos_ids, pad_id=pad_id, on_step=on_step,
            )
    model.train(was_training)
    return assemble_rollouts(tokenizer, encoded, [i for i, _ in rows], responses, eos_ids, pad_id)


def assemble_rollouts(tokenizer, prompt_rows: Sequence[Sequence[int]], prompt_index: Sequence[int],
                      responses: list[list[int]], eos_ids: set[int], pad_id: int,
                      sampled_logprobs: list[list[float]] | None = None) -> Rollouts:
    """`Rollouts` from each rollout's prompt (`prompt_rows[prompt_index[j]]`) and response,
    whichever engine sampled them."""
    input_ids, attention, response_mask = pack([prompt_rows[i] for i in prompt_index], responses,
                                               pad_id)
    return Rollouts(
        input_ids=input_ids,
        attention_mask=attention,
        response_mask=response_mask,
        prompt_index=torch.tensor(list(prompt_index), dtype=torch.long),
        truncated=torch.tensor([not r or r[-1] not in eos_ids for r in responses]),
        response_ids=responses,
        texts=tokenizer.batch_decode(responses, skip_special_tokens=True),
        sampled_logprobs=sampled_logprobs,
    )
