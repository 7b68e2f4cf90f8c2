"""The loss, all of it, as pure functions (docs/method.md#objectives).

Every distillation objective maps student log-probs `student_lp` [N, V] (with gradient),
teacher log-probs `teacher_lp` [N, V] (no gradient) and the sampled tokens `targets` [N] to a
loss per position [N]. `StepLoss` assembles a step's whole loss from them — aggregation
weights, the outcome advantage, the KL-to-reference penalty — and `TokenLoss` is its share for
one micro-batch, which the scoring pass sums chunk by chunk, so no [B, T, V] tensor of both
models ever exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from opd.config import choices
from opd.config.choices import CONTROL_CONSTANT, CONTROL_SHUFFLED
from opd.config.training import ObjectiveConfig
from opd.step.distributions import (
    contains,
    known,
    masked_sum,
    renormalise,
    shared_topk,
    topk_indices,
)


def _gather(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return log_probs.gather(-1, targets[:, None]).squeeze(-1)


def sampled_reward(student_lp: torch.Tensor, teacher_lp: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    """r = log q(ŷ) − log p(ŷ) per position [N], detached: E[−r] = KL(p‖q)."""
    return (_gather(teacher_lp, targets) - _gather(student_lp, targets)).detach()


def sampled_token_loss(student_lp, teacher_lp, targets, config):
    """Policy gradient −r·log p(ŷ) with the sampled-token reward r (`sampled_reward`)."""
    return -sampled_reward(student_lp, teacher_lp, targets) * _gather(student_lp, targets)


Candidates = tuple[torch.Tensor, torch.Tensor]
"""A candidate set C_t per position as token ids [N, m] and which of them count [N, m]."""
CandidateRule = Callable[[Callable[[], torch.Tensor], Callable[[], torch.Tensor]], Candidates]


def _every(ids: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(ids, dtype=torch.bool)


def _both(s: torch.Tensor, t: torch.Tensor, keep_s: torch.Tensor,
          keep_t: torch.Tensor) -> Candidates:
    return torch.cat([s, t], -1), torch.cat([keep_s, keep_t], -1)


CANDIDATE_SETS: dict[str, CandidateRule] = {
    "student": lambda s, t: (s(), _every(s())),
    "teacher": lambda s, t: (t(), _every(t())),
    "intersection": lambda s, t: (s(), contains(s(), t())),
    "union": lambda s, t: _both(s(), t(), _every(s()), ~contains(t(), s())),
    "symmetric-difference": lambda s, t: _both(s(), t(), ~contains(s(), t()),
                                               ~contains(t(), s())),
}
"""Each rule combines the two top-k id sets, given as functions so that a rule computes only
the sets it uses (each once: `topk_indices` remembers them within `shared_topk`)."""
assert tuple(CANDIDATE_SETS) == choices.CANDIDATE_SETS


def candidate_set(student_lp, teacher_lp, k: int, strategy: str) -> Candidates:
    """The candidate set C_t of the top-k objectives, as ids and which of them count: the
    objectives then work on [N, ~k] gathered log-probs, never on [N, V] masks."""
    rule = CANDIDATE_SETS[strategy]
    with shared_topk():
        return rule(lambda: topk_indices(student_lp, k), lambda: topk_indices(teacher_lp, k))


WeightRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
WEIGHTINGS: dict[str, WeightRule] = {
    "student_p": lambda s, t, c: renormalise(s.detach(), c).exp(),
    "teacher_p": lambda s, t, c: renormalise(t, c).exp(),
    "none": lambda s, t, c: c.float() / c.sum(-1, keepdim=True).clamp(min=1),
}
"""Candidate weights from the student's and teacher's log-probs on the candidates [N, m] and
which candidates count [N, m]."""
assert tuple(WEIGHTINGS) == choices.WEIGHTINGS


def _on_candidates(student_lp, teacher_lp, config) -> tuple[torch.Tensor, ...]:
    """Student and teacher log-probs on the candidate set [N, m], and which entries count."""
    ids, counts = candidate_set(student_lp, teacher_lp, config.k, config.strategy)
    return student_lp.gather(-1, ids), teacher_lp.gather(-1, ids), counts


def topk_loss(student_lp, teacher_lp, targets, config):
    """−Σ_{v∈C} sg(w(v)·(log q(v) − log p(v)))·log p(v); with C = V and student_p weights
    its gradient is exactly that of the full reverse KL (Σ_v p ∇log p = 0)."""
    student, teacher, support = _on_candidates(student_lp, teacher_lp, config)
    weights = WEIGHTINGS[config.weighting](student, teacher, support)
    reward = weights * (teacher - student.detach())
    return -masked_sum(reward * student, support)


def subset_kl_loss(student_lp, teacher_lp, targets, config):
    """Exact KL(p̄‖q̄) of both distributions renormalised on the candidate set."""
    student, teacher, support = _on_candidates(student_lp, teacher_lp, config)
    student_bar = renormalise(student, support)
    teacher_bar = renormalise(teacher, support)
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


REST_FLOOR = 1e-8
"""Smallest teacher probability of the tokens without a counterpart, so that a student that
puts mass there where the teacher's vocabulary is all mapped pays a large, finite price."""


def cross_tokenizer_kl_loss(student_lp, teacher_lp, targets, config, aligned=None,
                            sorted_teacher=None):
    """Reverse KL across tokenizers (docs/method.md#across-tokenizers), per student position.

    At an exact position (`aligned` [N] True; every position for None) `teacher_lp` holds the
    teacher's log-probs of the student's tokens through the vocabulary map (unknown elsewhere),
    and the loss is the KL of the two distributions over the mapped tokens plus one class for
    all the others, each side's mass off the map: the full reverse KL when the vocabularies
    coincide. (Renormalising on the mapped tokens instead would let the student move mass to
    a mapped token wherever the teacher's own choice has no counterpart.) Elsewhere
    `teacher_lp` knows only the sampled token's entry, its share of the teacher's log-prob of
    the whole span, and the loss is the sampled-token policy gradient with that reward (none
    where it is −inf: no teacher text).

    With `config.sorted_weight` and `sorted_teacher` [N, V] (the teacher's probabilities in
    decreasing order at the first token of each span that does not align, NaN rows elsewhere:
    `TeacherChunk.sorted_probs`) it adds, there, that weight times ULD's distance between the
    two sorted probability vectors, Σ_r |p_(r) − q_(r)|: a distribution-level term that needs
    no vocabulary map, blind to which token holds which rank.
    """
    support = known(teacher_lp)
    student_p = student_lp.exp()
    mapped = (student_p * torch.where(support, student_lp - teacher_lp, 0.0)).sum(-1)
    student_rest = torch.where(support, torch.zeros_like(student_p), student_p).sum(-1)
    teacher_rest = 1 - torch.where(support, teacher_lp.exp(), 0.0).sum(-1)
    rest = student_rest * (student_rest.clamp(min=REST_FLOOR).log()
                           - teacher_rest.clamp(min=REST_FLOOR).log())
    exact = mapped + rest
    if aligned is None:
        return exact
    student = _gather(student_lp, targets)
    teacher = _gather(teacher_lp, targets)
    scored = known(teacher)
    reward = torch.where(scored, teacher - student.detach(), torch.zeros_like(student)).detach()
    loss = torch.where(aligned, exact, -reward * student)
    if sorted_teacher is None or not config.sorted_weight:
        return loss
    starts = ~sorted_teacher[:, 0].isnan()
    if not starts.any():
        return loss
    ranked = student_p.sort(-1, descending=True).values
    distance = (ranked - sorted_teacher.nan_to_num(0.0).to(ranked)).abs().sum(-1)
    return loss + config.sorted_weight * torch.where(starts, distance, 0.0)


Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "ObjectiveConfig"], torch.Tensor]
OBJECTIVES: dict[str, Objective] = {
    "sampled": sampled_token_loss,
    "topk": topk_loss,
    "subset_kl": subset_kl_loss,
    "full_reverse_kl": full_reverse_kl_loss,
    "forward_kl": forward_kl_loss,
    "jsd": jsd_loss,
    "cross_tokenizer_kl": cross_tokenizer_kl_loss,
}
assert tuple(OBJECTIVES) == choices.OBJECTIVES


# -- controls: the signal with the teacher's information taken out ---------------------------
# A short run can lift a student for reasons that owe nothing to what the teacher knows: the
# reverse-KL reward is negative on average, and a negative reward on every sampled token alone
# raises the student's entropy. Each control keeps the shape and scale of the real signal and
# removes one kind of teacher information (docs/diagnose.md#does-the-teacher-matter).
def constant_advantage(student_lp: torch.Tensor, teacher_lp: torch.Tensor,
                       targets: torch.Tensor) -> torch.Tensor:
    """The one advantage of the `constant` control: the mean sampled-token reward of the
    positions scored together (a detached scalar, ≤ 0 in expectation: minus the reverse KL;
    0 for no positions). The signal's scale, none of where the teacher agrees."""
    reward = sampled_reward(student_lp, teacher_lp, targets)
    return reward.mean() if reward.numel() else reward.new_zeros(())


def constant_advantage_loss(student_lp: torch.Tensor, teacher_lp: torch.Tensor,
                            targets: torch.Tensor) -> torch.Tensor:
    """−c·log p(ŷ) per position [N] with c = `constant_advantage`: every sampled token is
    pushed by the same amount, wherever the teacher agrees."""
    return -constant_advantage(student_lp, teacher_lp, targets) * _gather(student_lp, targets)


def shuffle_positions(teacher_lp: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """The teacher's log-probs [N, V] with row t taken from position `permutation[t]`: the
    teacher's distributions, none of which state they belong to."""
    return teacher_lp[permutation]


def distillation_loss(student_lp, teacher_lp, targets, config: ObjectiveConfig,
                      aligned: torch.Tensor | None = None,
                      sorted_teacher: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position loss [N] of the configured objective; `aligned` [N] marks the exact
    positions of a teacher with another vocabulary, and `sorted_teacher` [N, V] gives its
    sorted probabilities at span starts (both only with `cross_tokenizer_kl`).

    `config.control` replaces the teacher's signal by a control: `constant` is
    `constant_advantage_loss`; `shuffled` runs the objective on the teacher's log-probs
    permuted across these positions (torch's generator, which the run's seed sets)."""
    if config.control == CONTROL_CONSTANT:
        return constant_advantage_loss(student_lp, teacher_lp, targets)
    if config.control == CONTROL_SHUFFLED:
        permutation = torch.randperm(teacher_lp.shape[0], device=teacher_lp.device)
        teacher_lp = shuffle_positions(teacher_lp, permutation)
    if aligned is None:
        return OBJECTIVES[config.name](student_lp, teacher_lp, targets, config)
    return OBJECTIVES[config.name](student_lp, teacher_lp, targets, config, aligned=aligned,
                                   sorted_teacher=sorted_teacher)


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
    assert aggregation == "sequence-mean", aggregation
    lengths = mask.sum(-1, keepdim=True).clamp(min=1)
    return mask / lengths / max(total_sequences, 1.0)


def truncated_importance_weight(trainer_lp: torch.Tensor, engine_lp: torch.Tensor,
                                cap: float) -> torch.Tensor:
    """min(p(ŷ) / μ(ŷ), cap) per token, detached: corrects for the rollout engine's
    distribution μ differing from the trainer's p (truncated importance sampling, as verl and
    NeMo-RL offer it)."""
    return (trainer_lp.detach() - engine_lp).exp().clamp(max=cap)


@dataclass(frozen=True)
class TokenLoss:
    """One micro-batch's share of the step's loss, per response token [M] (no gradient):

    loss = Σ_t weight_t · ρ_t · (distill_weight · D_t − advantage_t · log p(ŷ_t) + kl_coef · K_t)

    with D the distillation objective, K the k3 penalty against `reference_lp`, and ρ_t the
    truncated importance weight min(p(ŷ_t) / μ(ŷ_t), tis_cap) (detached) against the rollout
    engine's log-probs `behaviour_lp` when `tis_cap` is set (else 1).
    """

    objective: ObjectiveConfig
    weight: torch.Tensor
    advantage: torch.Tensor | None = None
    reference_lp: torch.Tensor | None = None
    distill_weight: float = 1.0
    kl_coef: float = 0.0
    behaviour_lp: torch.Tensor | None = None
    tis_cap: float = 0.0

    def select(self, tokens: torch.Tensor | None) -> TokenLoss:
        """The share of the tokens where `tokens` [M] is True (all of them for None)."""
        if tokens is None:
            return self
        def pick(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values[tokens]

        return replace(self, weight=self.weight[tokens], advantage=pick(self.advantage),
                       reference_lp=pick(self.reference_lp), behaviour_lp=pick(self.behaviour_lp))

    def chunk(self, student_lp: torch.Tensor, teacher_lp: torch.Tensor, targets: torch.Tensor,
              token_lp: torch.Tensor, part: slice, aligned: torch.Tensor | None = None,
              sorted_teacher: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted loss summed over the positions `part` of the micro-batch (`aligned`,
        `sorted_teacher`: as for `distillation_loss`)."""
        per_token = torch.zeros_like(token_lp)
        if self.distill_weight:
            per_token = per_token + self.distill_weight * distillation_loss(
                student_lp, teacher_lp, targets, self.objective, aligned, sorted_teacher
            )
        if self.advantage is not None:
            per_token = per_token - self.advantage[part] * token_lp
        if self.reference_lp is not None and self.kl_coef:
            per_token = per_token + self.kl_coef * reference_kl_penalty(
                token_lp, self.reference_lp[part])
        if self.behaviour_lp is not None and self.tis_cap:
            per_token = per_token * truncated_importance_weight(
                token_lp, self.behaviour_lp[part], self.tis_cap)
        return (self.weight[part] * per_token).sum()


@dataclass(frozen=True)
class StepLoss:
    """The loss of one step over the global batch, before it is split into micro-batches.

    `weight` [N, L] aggregates per-token losses into the chosen mean over the whole batch (all
    processes); `advantage` [N] is the outcome advantage already scaled by `outcome_weight`.
    """

    objective: ObjectiveConfig
    response_mask: torch.Tensor
    weight: torch.Tensor
    advantage: torch.Tensor | None
    distill_weight: float
    kl_coef: float
    tis_cap: float = 0.0

    @classmethod
    def build(cls, objective: ObjectiveConfig, response_mask: torch.Tensor, *, aggregation: str,
              total_tokens: float, total_rows: float, distill_weight: float, kl_coef: float,
              outcome_weight: float = 0.0, rewards: torch.Tensor | None = None,
              groups: torch.Tensor | None = None, tis_cap: float = 0.0) -> StepLoss:
        """`rewards` [N] and `groups` [N] (prompt of each rollout) are needed when
        `outcome_weight` is not 0."""
        advantage = None
        if outcome_weight:
            advantage = outcome_weight * group_advantages(rewards, groups)
        weight = aggregation_weights(response_mask, aggregation, total_tokens, total_rows)
        return cls(objective, response_mask, weight, advantage, distill_weight, kl_coef, tis_cap)

    def rows(self, rows: slice, token_rows: torch.Tensor, device: torch.device,
             reference_lp: torch.Tensor | None = None,
             behaviour_lp: torch.Tensor | None = None) -> TokenLoss:
        """The share of rollouts `rows`, per response token; `token_rows` [M] is the row (within
        `rows`) of each token, as `ResponseStates.rows` gives it; `behaviour_lp` [M] the rollout
        engine's log-probs of the tokens (for `tis_cap`)."""
        predicts = self.response_mask[rows][:, 1:]
        advantage = None
        if self.advantage is not None:
            advantage = self.advantage[rows][token_rows.cpu()].to(device)
        return TokenLoss(
            objective=self.objective, weight=self.weight[rows][:, 1:][predicts].to(device),
            advantage=advantage, reference_lp=reference_lp,
            distill_weight=self.distill_weight, kl_coef=self.kl_coef,
            behaviour_lp=None if behaviour_lp is None else behaviour_lp.to(device),
            tis_cap=self.tis_cap,
        )
