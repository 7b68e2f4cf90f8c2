"""Small pure helpers on next-token log-probabilities, shape [N, V] (N positions)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

_TOPK_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("topk_memo", default=None)


@contextlib.contextmanager
def shared_topk_masks() -> Iterator[None]:
    """Within the block, `topk_mask` of one tensor (or a view of the same storage) and one k is
    computed once: the objective and the measures of a chunk ask for the same masks."""
    token = _TOPK_MEMO.set({})
    try:
        yield
    finally:
        _TOPK_MEMO.reset(token)


def topk_mask(log_probs: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [N, V]: the k most likely tokens per row; ties go to the lower token id.

    Deterministic tie-breaking keeps every measure a function of the distributions alone.
    """
    memo = _TOPK_MEMO.get()
    if memo is None:
        return _topk_mask(log_probs, k)
    key = (log_probs.data_ptr(), tuple(log_probs.shape), log_probs.stride(), log_probs.dtype,
           log_probs._version, k)
    if key not in memo:  # the tensor is kept with its mask, so its storage is not reused
        memo[key] = (log_probs, _topk_mask(log_probs, k))
    return memo[key][1]


def _topk_mask(log_probs: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, log_probs.shape[-1])
    threshold = log_probs.topk(k, dim=-1).values[..., -1:]
    above = log_probs > threshold
    tied = log_probs == threshold
    room = k - above.sum(-1, keepdim=True)
    return above | (tied & (tied.cumsum(-1) <= room))


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy per row, in nats."""
    return -(log_probs.exp() * log_probs).sum(-1)


def renormalise(log_probs: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """log p̄ = log p restricted to `support` and renormalised; -inf off the support."""
    restricted = log_probs.masked_fill(~support, float("-inf"))
    norm = restricted.logsumexp(-1, keepdim=True)
    return (restricted - norm).masked_fill(~support, float("-inf"))


def masked_sum(values: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Σ over the support per row, treating off-support entries (even ±inf/nan) as 0."""
    return torch.where(support, values, torch.zeros_like(values)).sum(-1)
