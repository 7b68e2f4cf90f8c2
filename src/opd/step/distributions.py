"""Small pure helpers on next-token log-probabilities, shape [N, V] (N positions)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

UNKNOWN_LOGPROB = -1e30
"""Log-prob of entries a teacher did not give (a served teacher's unsent ones, a teacher of
another vocabulary's tokens without a counterpart): below every real log-prob, so top-k and
renormalisation on the known entries are exact, and finite, so a weight of 0 times it is 0
(−inf would turn the zero gradient off the known entries into NaN)."""


def known(log_probs: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the entries that hold a real log-prob (not `UNKNOWN_LOGPROB` or −inf)."""
    return log_probs > UNKNOWN_LOGPROB / 2


_TOPK_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("topk_memo", default=None)


@contextlib.contextmanager
def shared_topk() -> Iterator[None]:
    """Within the block, the top-k of one tensor (or a view of the same storage) is computed
    once for every k asked: the objective and the measures of a chunk ask for the same sets.
    Nested blocks share the outermost one's memory."""
    if _TOPK_MEMO.get() is not None:
        yield
        return
    token = _TOPK_MEMO.set({})
    try:
        yield
    finally:
        _TOPK_MEMO.reset(token)


def topk_indices(log_probs: torch.Tensor, k: int) -> torch.Tensor:
    """Ids [N, min(k, V)] of the k most likely tokens per row, in no particular order; ties at
    the k-th place go to the lower token id.

    Deterministic tie-breaking keeps every measure a function of the distributions alone.
    """
    vocab = log_probs.shape[-1]
    k = min(k, vocab)
    if k == vocab:
        return torch.arange(vocab, device=log_probs.device).expand(log_probs.shape[0], vocab)
    memo = _TOPK_MEMO.get()
    if memo is None:
        return _settle_ties(*_sorted_top(log_probs, k), log_probs, k)
    key = (log_probs.data_ptr(), tuple(log_probs.shape), log_probs.stride(), log_probs.dtype,
           log_probs._version)
    # The tensor is kept with its top entries, so its storage is not reused; the largest k
    # asked so far serves every smaller one.
    if key not in memo or memo[key][1].shape[-1] <= k:
        memo[key] = (log_probs, *_sorted_top(log_probs, k))
    _, values, ids = memo[key]
    return _settle_ties(values, ids, log_probs, k)


def _sorted_top(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k + 1 largest values and their ids per row, largest first (one more than asked, to
    see a tie at the k-th place); k < V."""
    return log_probs.detach().topk(k + 1, dim=-1)


def _settle_ties(values: torch.Tensor, ids: torch.Tensor, log_probs: torch.Tensor,
                 k: int) -> torch.Tensor:
    """The top-k ids from the sorted top entries; rows tied at the k-th place (rare with real
    log-probs) are settled by token id on the whole row."""
    top = ids[:, :k]
    tied = (values[:, k - 1] == values[:, k]).nonzero()[:, 0]
    if tied.numel():
        top = top.clone()
        top[tied] = _ties_to_lower_id(log_probs[tied].detach(), k).nonzero()[:, 1].view(-1, k)
    return top


def _ties_to_lower_id(log_probs: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [N, V] top-k mask taking tied tokens at the threshold in token-id order."""
    threshold = log_probs.topk(k, dim=-1).values[..., -1:]
    above = log_probs > threshold
    tied = log_probs == threshold
    room = k - above.sum(-1, keepdim=True)
    return above | (tied & (tied.cumsum(-1) <= room))


def contains(ids: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Boolean [N, a]: whether each id of `ids` [N, a] is among `others` [N, b] in its row."""
    return (ids[:, :, None] == others[:, None, :]).any(-1)


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
