"""Scoring student and teacher on the student's states, a chunk of positions at a time.

Both models run their backbone once over the rollouts (hidden states [B, L, H] are small);
the output head, log-softmax, objective and measures then run on `chunk_size` positions at a
time. Under gradient the student's chunk is checkpointed, so backward recomputes its logits
instead of keeping them: peak memory grows with chunk_size × V, not with B × T × V.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from opd.measures import MEASURES, token_measures
from opd.objectives import ObjectiveConfig, distillation_loss, reference_kl_penalty

Head = Callable[[torch.Tensor], torch.Tensor]


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model: torch.nn.Module) -> Head:
    """hidden [n, H] → logits [n, V] (float32), including a model's logit scaling or cap."""
    model = _hf_model(model)
    head = model.get_output_embeddings()
    config = model.config
    scale = getattr(config, "logit_scale", None)
    cap = getattr(config, "final_logit_softcapping", None)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = head(hidden).float()
        if scale is not None:
            out = out * scale
        if cap:
            out = torch.tanh(out / cap) * cap
        return out

    return logits


@dataclass
class ResponseStates:
    """Hidden states [M, H] that predict the M response tokens, in row-major order."""

    hidden: torch.Tensor
    targets: torch.Tensor  # [M] token ids
    positions: torch.Tensor  # [M] 0-based position within the response
    rows: torch.Tensor  # [M] rollout row


def response_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
) -> ResponseStates:
    """Run the backbone (no output head) and keep the states before each response token."""
    model = _hf_model(model)
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    response_mask = response_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state
    predicts = response_mask[:, 1:]
    rows = torch.arange(input_ids.shape[0], device=device)[:, None].expand_as(predicts)
    positions = (predicts.cumsum(-1) - 1).clamp(min=0)
    return ResponseStates(
        hidden=hidden[:, :-1][predicts],
        targets=input_ids[:, 1:][predicts],
        positions=positions[predicts],
        rows=rows[predicts],
    )


@dataclass(frozen=True)
class TokenTerms:
    """Per-token coefficients [M] of the total loss, all without gradient.

    loss = Σ_t weight_t · (distill_weight · D_t − advantage_t · log p(ŷ_t) + kl_coef · K_t)
    with D the distillation objective and K the k3 penalty against `reference_lp`.
    """

    weight: torch.Tensor
    advantage: torch.Tensor | None = None
    reference_lp: torch.Tensor | None = None
    distill_weight: float = 1.0
    kl_coef: float = 0.0


def _chunk_loss(
    student_hidden, teacher_hidden, targets, weight, advantage, reference_lp,
    *, student_head, teacher_head, teacher_temperature, objective, distill_weight, kl_coef,
    measure_k,
):
    student_lp = student_head(student_hidden).log_softmax(-1)
    with torch.no_grad():
        teacher_lp = (teacher_head(teacher_hidden) / teacher_temperature).log_softmax(-1)
    token_lp = student_lp.gather(-1, targets[:, None]).squeeze(-1)
    per_token = torch.zeros_like(token_lp)
    if distill_weight:
        per_token = per_token + distill_weight * distillation_loss(
            student_lp, teacher_lp, targets, objective
        )
    if advantage is not None:
        per_token = per_token - advantage * token_lp
    if reference_lp is not None and kl_coef:
        per_token = per_token + kl_coef * reference_kl_penalty(token_lp, reference_lp)
    measures = token_measures(student_lp, teacher_lp, targets, measure_k)
    return (weight * per_token).sum(), token_lp.detach(), *measures.values()


def score_and_loss(
    student: ResponseStates,
    teacher: ResponseStates,
    *,
    student_head: Head,
    teacher_head: Head,
    terms: TokenTerms,
    objective: ObjectiveConfig,
    teacher_temperature: float = 1.0,
    measure_k: int = 16,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss (a scalar with gradient when the student states have one), the student's
    log-prob of each sampled token [M], and every measure per token [M]."""
    total = student.hidden.new_zeros((), dtype=torch.float32)
    token_lps, columns = [], {name: [] for name in MEASURES}
    teacher_hidden = teacher.hidden.to(student.hidden.device)
    grad = student.hidden.requires_grad and torch.is_grad_enabled()
    for start in range(0, student.hidden.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        args = (
            student.hidden[part], teacher_hidden[part], student.targets[part], terms.weight[part],
            None if terms.advantage is None else terms.advantage[part],
            None if terms.reference_lp is None else terms.reference_lp[part],
        )
        options = dict(
            student_head=student_head, teacher_head=teacher_head,
            teacher_temperature=teacher_temperature, objective=objective,
            distill_weight=terms.distill_weight, kl_coef=terms.kl_coef, measure_k=measure_k,
        )
        if grad:
            loss, token_lp, *values = checkpoint(_chunk_loss, *args, use_reentrant=False, **options)
        else:
            loss, token_lp, *values = _chunk_loss(*args, **options)
        total = total + loss
        token_lps.append(token_lp)
        for name, value in zip(MEASURES, values, strict=True):
            columns[name].append(value)
    measures = {name: torch.cat(parts) if parts else torch.empty(0) for name, parts in columns.items()}
    return total, torch.cat(token_lps) if token_lps else torch.empty(0), measures
