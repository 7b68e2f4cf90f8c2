"""avg@n accuracy of a model on a prompt set with reference answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from opd.data.prompts import PromptRecord, render_prompt
from opd.errors import OPDError
from opd.rollout import generate_rollouts
from opd.verify import get_verifier


@dataclass(frozen=True)
class EvalResult:
    """Mean over prompts of the share of its `n` samples that the verifier accepts."""

    accuracy: float
    per_prompt: list[float]
    n_prompts: int
    n: int
    mean_response_length: float
    truncation_rate: float


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[PromptRecord],
    *,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    verifier: str = "exact",
    template: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> EvalResult:
    """Sample `n` responses per prompt (greedy at temperature 0) and verify each one."""
    missing = [i for i, r in enumerate(records) if r.answer is None]
    if missing:
        raise OPDError(
            f"evaluation prompts: row {missing[0] + 1} has no 'answer' field; "
            "evaluation needs a reference answer for every prompt"
        )
    check = get_verifier(verifier)
    texts = [render_prompt(r.messages, tokenizer, template) for r in records]
    rollouts = generate_rollouts(
        model, tokenizer, texts, n=n, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
    )
    correct = [
        float(check(text, records[int(i)].answer))
        for text, i in zip(rollouts.texts, rollouts.prompt_index, strict=True)
    ]
    per_prompt = [sum(correct[j * n : (j + 1) * n]) / n for j in range(len(records))]
    return EvalResult(
        accuracy=sum(per_prompt) / max(len(per_prompt), 1),
        per_prompt=per_prompt,
        n_prompts=len(records),
        n=n,
        mean_response_length=float(rollouts.response_lengths.float().mean()),
        truncation_rate=float(rollouts.truncated.float().mean()),
    )
