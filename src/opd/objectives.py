"""Distillation objectives as pure per-position losses (SPEC §2).

Every objective maps student log-probs `student_lp` [N, V] (with gradient), teacher log-probs
`teacher_lp` [N, V] (no gradient) and the sampled tokens `targets` [N] to a loss per position
[N]. The training loop sums them over positions chunk by chunk, so no [B, T, V] tensor of
both models ever exists. Aggregation over positions and sequences, the outcome advantage and
the reference penalty live here too, as pure functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from opd.distributions import masked_sum, renormalise, topk_mask
from opd.errors import OPDError


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which per-token objective to use, and its knobs."""

    name: str = "topk"
    """One of OBJECTIVES: sampled, topk, subset_kl, full_reverse_kl, forward_kl, jsd."""
    k: int = 16
    """Top-k size for `topk` and `subset_kl`."""
    strategy: str = "student"
    """Candidate set: student, teacher, intersection, union, symmetric-difference."""
    weighting: str = "student_p"
    """Candidate weights: student_p, teacher_p, none."""
    beta: float = 0.5
    """JSD interpolation: 0 = forward KL(teacher‖student), 1 = reverse KL(student‖teacher)."""


def _gather(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return log_probs.gather(-1, targets[:, None]).squeeze(-1)


def sampled_token_loss(student_lp, teacher_lp, targets, config):
    """Policy gradient with reward r = log q(ŷ) − log p(ŷ), detached: E[−r] = KL(p‖q)."""
    student = _gather(student_lp, targets)
    reward = (_gather(teacher_lp, targets) - student).detach()
    return -reward * student


CandidateRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CANDIDATE_SETS: dict[str, CandidateRule] = {
    "student": lambda s, t: s,
    "teacher": lambda s, t: t,
    "intersection": lambda s, t: s & t,
    "union": lambda s, t: s | t,
    "symmetric-difference": lambda s, t: s ^ t,
}


def candidate_set(student_lp, teacher_lp, k: int, strategy: str) -> torch.Tensor:
    """Boolean [N, V] candidate set C_t for the top-k objectives."""
    rule = CANDIDATE_SETS[strategy]
    return rule(topk_mask(student_lp.detach(), k), topk_mask(teacher_lp, k))


WeightRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
WEIGHTINGS: dict[str, WeightRule] = {
    "student_p": lambda s, t, c: renormalise(s.detach(), c).exp(),
    "teacher_p": lambda s, t, c: renormalise(t, c).exp(),
    "none": lambda s, t, c: c.float() / c.sum(-1, keepdim=True).clamp(min=1),
}


def topk_loss(student_lp, teacher_lp, targets, config):
    """−Σ_{v∈C} sg(w(v)·(log q(v) − log p(v)))·log p(v); with C = V and student_p weights
    its gradient is exactly that of the full reverse KL (Σ_v p ∇log p = 0)."""
    support = candidate_set(student_lp, teacher_lp, config.k, config.strategy)
    weights = WEIGHTINGS[config.weighting](student_lp, teacher_lp, support)
    reward = (weights * (teacher_lp - student_lp)).detach()
    return -masked_sum(reward * student_lp, support)


def subset_kl_loss(student_lp, teacher_lp, targets, config):
    """Exact KL(p̄‖q̄) of both distributions renormalised on the candidate set."""
    support = candidate_set(student_lp, teacher_lp, config.k, config.strategy)
    student_bar = renormalise(student_lp, support)
    teacher_bar = renormalise(teacher_lp, support)
    return masked_sum(student_bar.exp() * (student_bar - teacher_bar), support)


def full_reverse_kl_loss(student_lp, teacher_lp, targets, config):
    """KL(p‖q) over the whole vocabulary."""
    return (student_lp.exp() * (student_lp - teacher_lp)).sum(-1)


def forward_kl_loss(student_lp, teacher_lp, targets, config):
    """KL(q‖p) over the whole vocabulary (supervised KD direction)."""
    return (teacher_lp.exp() * (teacher_lp - student_lp)).sum(-1)


def jsd_loss(student_lp, teacher_lp, targets, config):
    """Generalised JSD(β) as in GKD: β·KL(q‖m) + (1−β)·KL(p‖m), m = β·q + (1−β)·p
    in the β→0 / β→1 limits falling back to forward / reverse KL."""
    beta = config.beta
    if beta <= 0:
        return forward_kl_loss(student_lp, teacher_lp, targets, config)
    if beta >= 1:
        return full_reverse_kl_loss(student_lp, teacher_lp, targets, config)
    mixture = torch.logsumexp(
        torch.stack([student_lp + torch.log1p(torch.tensor(-beta)), teacher_lp + torch.log(
            torch.tensor(beta))]), dim=0
    )
    kl_teacher = (teacher_lp.exp() * (teacher_lp - mixture)).sum(-1)
    kl_student = (student_lp.exp() * (student_lp - mixture)).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ObjectiveConfig], torch.Tensor]
OBJECTIVES: dict[str, Objective] = {
    "sampled": sampled_token_loss,
    "topk": topk_loss,
    "subset_kl": subset_kl_loss,
    "full_reverse_kl": full_reverse_kl_loss,
    "forward_kl": forward_kl_loss,
    "jsd": jsd_loss,
}


def validate_objective(config: ObjectiveConfig) -> None:
    """Raise OPDError naming the field and its choices when a setting is unknown."""
    choices = {
        "objective": (config.name, OBJECTIVES),
        "topk_strategy": (config.strategy, CANDIDATE_SETS),
        "topk_weighting": (config.weighting, WEIGHTINGS),
    }
    for field_name, (value, table) in choices.items():
        if value not in table:
            raise OPDError(f"{field_name}: unknown value {value!r}; choose one of {sorted(table)}")
    if config.k < 1:
        raise OPDError(f"topk: must be at least 1, got {config.k}")
    if not 0 <= config.beta <= 1:
        raise OPDError(f"jsd_beta: must lie in [0, 1], got {config.beta}")


def distillation_loss(student_lp, teacher_lp, targets, config: ObjectiveConfig) -> torch.Tensor:
    """Per-position loss [N] of the configured objective."""
    return OBJECTIVES[config.name](student_lp, teacher_lp, targets, config)


def reference_kl_penalty(student_token_lp: torch.Tensor, reference_token_lp: torch.Tensor):
    """Per-token k3 estimate of KL(π_θ‖π_ref) on the sampled tokens (low variance, ≥ 0)."""
    log_ratio = reference_token_lp - student_token_lp
    return log_ratio.exp() - log_ratio - 1


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6):
    """GRPO's outcome advantage: each reward minus its group's mean, over the group's std."""
    advantages = torch.zeros_like(rewards, dtype=torch.float)
    for group in group_ids.unique():
        members = group_ids == group
        values = rewards[members].float()
        std = values.std(unbiased=False) if values.numel() > 1 else torch.tensor(0.0)
        advantages[members] = (values - values.mean()) / (std + eps)
    return advantages


AGGREGATIONS = ("token-mean", "sequence-mean")


def aggregation_weights(
    response_mask: torch.Tensor, aggregation: str, total_tokens: float, total_sequences: float
) -> torch.Tensor:
    """Per-token weights [B, T] so that Σ weight·loss is the chosen mean over the global batch.

    `total_tokens` / `total_sequences` count the whole batch across processes, so that summing
    gradients over processes reproduces the single-process loss exactly.
    """
    mask = response_mask.float()
    if aggregation == "token-mean":
        return mask / max(total_tokens, 1.0)
    if aggregation == "sequence-mean":
        lengths = mask.sum(-1, keepdim=True).clamp(min=1)
        return mask / lengths / max(total_sequences, 1.0)
    raise OPDError(f"loss_aggregation: unknown value {aggregation!r}; choose one of {AGGREGATIONS}")
