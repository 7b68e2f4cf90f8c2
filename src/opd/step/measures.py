"""The study's dynamic measures (docs/method.md#measures), per position and aggregated.

`token_measures` maps one chunk of positions to a value per position for every token measure
(named as in `opd.metrics`); `position_totals` and `means_from_totals` average them over
valid positions, overall and by response-position bins. Pure functions: no model, no I/O.
"""

from __future__ import annotations

import math

import torch

from opd import metrics as M
from opd.step.distributions import (
    contains,
    entropy,
    known,
    masked_sum,
    shared_topk,
    topk_indices,
)


@torch.no_grad()
def token_measures(
    student_lp: torch.Tensor, teacher_lp: torch.Tensor, targets: torch.Tensor, k: int,
    teacher_entropy: torch.Tensor | None = None, aligned: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Each measure per position [N] from log-probs [N, V] and sampled tokens [N].

    `teacher_entropy` [N] replaces the entropy of `teacher_lp` where that holds only some
    entries (a served teacher's); every other measure reads only its top-k and sampled tokens.

    `aligned` [N] marks, for a teacher with another vocabulary, the exact positions, where
    `teacher_lp` is its distribution mapped onto the student's vocabulary: the teacher measures
    are then taken there only (NaN elsewhere), on the mapped shared vocabulary (both top-k among
    the mapped tokens; the overlap ratio out of k or of the mapped tokens if fewer), with
    `aligned_share` (1 at an exact position, 0 elsewhere); `reverse_kl` stays at every position,
    each token's share of its span's log-ratio.

    `overlap_token_advantage` is NaN where the two top-k sets share no token (undefined);
    `position_totals` leaves such positions out of its mean.
    """
    dtype = torch.promote_types(student_lp.dtype, torch.float32)
    student_lp, teacher_lp = student_lp.detach().to(dtype), teacher_lp.to(dtype)
    k = min(k, student_lp.shape[-1])
    # Everything about the shared set reads the student's top-k ids [N, k] and the log-probs
    # gathered there, never an [N, V] mask.
    slots = torch.full_like(targets, k, dtype=dtype)
    with shared_topk():
        if aligned is None:
            ids = topk_indices(student_lp, k)
            shared = contains(ids, topk_indices(teacher_lp, k))
        else:  # both top-k among the mapped tokens, of which a row may have fewer than k
            mapped = known(teacher_lp)
            ids = topk_indices(student_lp.masked_fill(~mapped, -math.inf), k)
            shared = contains(ids, topk_indices(teacher_lp, k)) & mapped.gather(-1, ids)
            slots = mapped.sum(-1).clamp(min=1, max=k).to(dtype)
    student_top, teacher_top = student_lp.gather(-1, ids), teacher_lp.gather(-1, ids)
    n_shared = shared.sum(-1)
    # Log of each model's mass on the shared set (−inf where it is empty), and the student's
    # renormalised there, p̄; as Σ p̄ = 1, Σ p̄·(log q̄ − log p̄) = Σ p̄·(log q − log p) +
    # log P(shared) − log Q(shared): no renormalised teacher needed.
    student_mass = student_top.masked_fill(~shared, -math.inf).logsumexp(-1)
    teacher_mass = teacher_top.masked_fill(~shared, -math.inf).logsumexp(-1)
    student_bar = (student_top - student_mass[:, None]).exp()
    advantage = (masked_sum(student_bar * (teacher_top - student_top), shared)
                 + student_mass - teacher_mass)
    advantage = torch.where(n_shared > 0, advantage / n_shared.clamp(min=1), math.nan)
    student_h = entropy(student_lp)
    teacher_h = entropy(teacher_lp) if teacher_entropy is None else teacher_entropy.to(dtype)
    tokens = targets[:, None]
    values = {
        M.OVERLAP_RATIO: n_shared.to(dtype) / slots,
        M.OVERLAP_TOKEN_ADVANTAGE: advantage,
        M.ENTROPY_GAP: (teacher_h - student_h).abs(),
        M.OVERLAP_MASS_STUDENT: student_mass.exp(),
        M.OVERLAP_MASS_TEACHER: teacher_mass.exp(),
        M.STUDENT_ENTROPY: student_h,
        M.TEACHER_ENTROPY: teacher_h,
        M.REVERSE_KL: (student_lp.gather(-1, tokens) - teacher_lp.gather(-1, tokens)).squeeze(-1),
    }
    if aligned is None:
        return values
    teacher_only = set(M.TEACHER_MEASURES) - {M.REVERSE_KL}
    values = {name: torch.where(aligned, value, math.nan) if name in teacher_only else value
              for name, value in values.items()}
    reverse_kl = values[M.REVERSE_KL]
    values[M.REVERSE_KL] = torch.where(reverse_kl.isfinite(), reverse_kl, math.nan)
    return {**values, M.ALIGNED_SHARE: aligned.to(dtype)}


@torch.no_grad()
def topk_mass(log_probs: torch.Tensor, k: int) -> torch.Tensor:
    """Probability [N] that a distribution puts on its own top-k tokens."""
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    log_probs = log_probs.detach().to(dtype)
    return log_probs.gather(-1, topk_indices(log_probs, k)).exp().sum(-1)


def position_bin_edges(max_len: int, n_bins: int) -> list[int]:
    """Start position of each of `n_bins` equal bins over [0, max_len)."""
    n_bins = max(1, min(n_bins, max_len))
    return [math.floor(i * max_len / n_bins) for i in range(n_bins)]


def position_totals(
    values: dict[str, torch.Tensor], positions: torch.Tensor, bin_edges: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and counts [len(values), 1 + bins] of each measure: column 0 over all positions,
    then one column per position bin; NaN entries are left out. Totals (not means) so that
    processes and micro-batches can be added up before dividing."""
    edges = torch.tensor(bin_edges)
    bins = torch.bucketize(positions.cpu(), edges, right=True) - 1
    onehot = torch.nn.functional.one_hot(bins, len(bin_edges)).bool()
    columns = torch.cat([torch.ones_like(onehot[:, :1]), onehot], dim=1)  # [M, 1 + bins]
    sums, counts = [], []
    for value in values.values():
        value = value.float().cpu()
        valid = (~value.isnan())[:, None] & columns
        sums.append(torch.where(valid, value[:, None], 0.0).sum(0))
        counts.append(valid.sum(0).float())
    return torch.stack(sums).double(), torch.stack(counts).double()


def means_from_totals(
    names: list[str] | tuple[str, ...], sums: torch.Tensor, counts: torch.Tensor
) -> tuple[dict[str, float | None], dict[str, list[float | None]]]:
    """Overall and per-bin means from `position_totals` (None where nothing was counted)."""
    means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan)
    overall: dict[str, float | None] = {}
    by_position: dict[str, list[float | None]] = {}
    for name, row in zip(names, means.tolist(), strict=True):
        cleaned = [None if math.isnan(v) else v for v in row]
        overall[name], by_position[name] = cleaned[0], cleaned[1:]
    return overall, by_position
