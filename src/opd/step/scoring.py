"""Scoring student and teacher on the student's states: one chunked pass, two consumers.

Both models run their backbone once over the rollouts (hidden states [B, L, H] are small);
the output head and log-softmax then run on `chunk_size` positions at a time, and each chunk's
log-probs go to the two consumers of the pass: the loss (`objectives.TokenLoss`) and the
measures (a function returning named per-token values, e.g. `measures.token_measures`). Either
may be absent: diagnose asks for measures only.

Under gradient each chunk is differentiated as soon as it is scored: the gradient flows into
the output head's parameters and into the chunk's hidden states, and the chunk's logits are
freed. The pass returns a loss whose backward carries the collected hidden-state gradient
into the backbone. So peak memory grows with chunk_size × V, not with B × T × V, and nothing
is computed twice (no recomputation, the measures once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from opd.step.alignment import TokenAlignment
from opd.step.distributions import UNKNOWN_LOGPROB, shared_topk, topk_indices
from opd.step.objectives import TokenLoss

Head = Callable[[torch.Tensor], torch.Tensor]


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model: torch.nn.Module) -> Head:
    """hidden [n, H] → logits [n, V] (float32), including a model's logit scaling or cap."""
    model = hf_model(model)
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


def vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's output head: the size of its next-token distributions."""
    return int(hf_model(model).get_output_embeddings().weight.shape[0])


@dataclass
class ResponseStates:
    """Hidden states [M, H] that predict the M response tokens, in row-major order."""

    hidden: torch.Tensor
    targets: torch.Tensor  # [M] token ids
    positions: torch.Tensor  # [M] 0-based position within the response
    rows: torch.Tensor  # [M] rollout row

    def select(self, tokens: torch.Tensor | None) -> ResponseStates:
        """The states of the tokens where `tokens` [M] is True (all of them for None)."""
        if tokens is None:
            return self
        return ResponseStates(self.hidden[tokens], self.targets[tokens], self.positions[tokens],
                              self.rows[tokens])


def response_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
) -> ResponseStates:
    """Run the backbone (no output head) and keep the states before each response token."""
    model = hf_model(model)
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    response_mask = response_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(  # no KV cache: a recomputed (checkpointed) layer would fill it twice
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state
    predicts = response_mask[:, 1:]
    positions = (predicts.cumsum(-1) - 1).clamp(min=0)
    return ResponseStates(
        hidden=hidden[:, :-1][predicts],
        targets=input_ids[:, 1:][predicts],
        positions=positions[predicts],
        rows=response_token_rows(response_mask),
    )


def response_token_rows(response_mask: torch.Tensor) -> torch.Tensor:
    """The row of each response token [M], in row-major order (`ResponseStates.rows`), known
    before any forward pass."""
    return response_mask[:, 1:].nonzero()[:, 0]


def reference_token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor,
                             attention_mask: torch.Tensor, response_mask: torch.Tensor,
                             chunk_size: int) -> torch.Tensor:
    """The reference model's log-prob [M] of each response token (for the KL-to-reference
    penalty): its backbone once, its output head `chunk_size` positions at a time."""
    states = response_states(model, input_ids, attention_mask, response_mask)
    head = output_head(model)
    return torch.cat([
        head(h).log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)
        for h, t in zip(states.hidden.split(chunk_size), states.targets.split(chunk_size),
                        strict=True)
    ])


CHUNK_LOGITS = 1 << 23
"""Logits in one chunk of the automatic chunk plan: a [positions, V] float32 tensor of 32 MiB,
what 256 positions of a 32k vocabulary take."""


def positions_per_chunk(chunk_size: int, vocab_size: int) -> int:
    """`chunk_size`, or for 0 the plan from the sizes: as many positions as keep one chunk
    within `CHUNK_LOGITS` logits, at least 256. A small vocabulary thus gets few large chunks
    (each chunk costs a fixed overhead) and a large one the memory bound of 256 positions."""
    return chunk_size or max(256, CHUNK_LOGITS // max(vocab_size, 1))


MeasureFn = Callable[..., dict[str, torch.Tensor]]
"""(student log-probs [n, V], teacher log-probs [n, V], sampled tokens [n]) → named values [n].
When the teacher's log-probs hold only some entries (a served teacher), it is also called with
`teacher_entropy=` [n], the teacher's exact entropy, which the entries cannot give; for a
teacher with another vocabulary also with `aligned=` [n] (`TeacherChunk.aligned`)."""


@dataclass
class TeacherChunk:
    """The teacher's log-probs [n, V] for a chunk of positions, at the teacher temperature.

    `entropy` is None when `log_probs` is the whole distribution. A served teacher sends only
    some entries (the sampled token, its top-k, the student's candidates) and puts
    `UNKNOWN_LOGPROB` elsewhere; its exact entropy [n] then comes with them."""

    log_probs: torch.Tensor
    entropy: torch.Tensor | None = None
    aligned: torch.Tensor | None = None
    """[n] for a teacher with another vocabulary: True at the exact positions, where
    `log_probs` maps the teacher's distribution onto the student's vocabulary; elsewhere it
    knows only the sampled token's share of its span's teacher log-prob
    (`objectives.cross_tokenizer_kl_loss`)."""
    sorted_probs: torch.Tensor | None = None
    """[n, V] for a teacher with another vocabulary asked for them (`objective.sorted_weight`):
    at the first token of a span that does not align, the teacher's probabilities there in
    decreasing order (its first V ranks; zeros past its own vocabulary); NaN rows elsewhere."""


class TeacherLogprobs(Protocol):
    """Something that gives the teacher's log-probs of the scored positions, a chunk at a time."""

    def chunk(self, part: slice, device: torch.device) -> TeacherChunk: ...


@dataclass
class LocalTeacher:
    """The in-process teacher: its backbone's states and its output head."""

    states: ResponseStates
    head: Head
    temperature: float = 1.0

    @torch.no_grad()
    def chunk(self, part: slice, device: torch.device) -> TeacherChunk:
        hidden = self.states.hidden[part].to(device)
        return TeacherChunk((self.head(hidden) / self.temperature).log_softmax(-1))


@dataclass
class AlignedTeacher:
    """An in-process teacher with another vocabulary: its states at its own response tokens and
    its head, brought to the student's positions and vocabulary by a `TokenAlignment`."""

    states: ResponseStates
    """The teacher's states at its response tokens (its re-tokenization of the student's
    text)."""
    head: Head
    alignment: TokenAlignment
    vocab_map: torch.Tensor
    """[student V] teacher id of each student token, −1 for none (`alignment.vocabulary_map`)."""
    targets: torch.Tensor
    """[M] the student's response tokens."""
    temperature: float = 1.0
    sorted_ranks: bool = False
    """Also give `TeacherChunk.sorted_probs` (for `objective.sorted_weight`)."""

    def __post_init__(self) -> None:
        self.span_lp = self.alignment.span_logprobs(self._token_logprobs())

    @torch.no_grad()
    def _token_logprobs(self, chunk_size: int = 256) -> torch.Tensor:
        """The teacher's log-prob [teacher M] of each of its response tokens."""
        parts = [(self.head(h) / self.temperature).log_softmax(-1).gather(-1, t[:, None])[:, 0]
                 for h, t in zip(self.states.hidden.split(chunk_size),
                                 self.states.targets.split(chunk_size), strict=True)]
        return torch.cat(parts) if parts else self.states.hidden.new_zeros(0)

    @torch.no_grad()
    def chunk(self, part: slice, device: torch.device) -> TeacherChunk:
        exact = self.alignment.exact[part].to(device)
        targets = self.targets[part].to(device)
        aligned = exact >= 0
        log_probs = torch.full((exact.shape[0], self.vocab_map.shape[0]), UNKNOWN_LOGPROB,
                               device=device)
        span_lp = self.span_lp[part].to(device)
        log_probs[~aligned, targets[~aligned]] = span_lp[~aligned].float()
        entropy = torch.full((exact.shape[0],), torch.nan, device=device)
        if aligned.any():
            hidden = self.states.hidden[exact[aligned].to(self.states.hidden.device)].to(device)
            teacher_lp = (self.head(hidden) / self.temperature).log_softmax(-1)
            vocab_map = self.vocab_map.to(device)
            mapped = teacher_lp[:, vocab_map.clamp(min=0)]
            log_probs[aligned] = mapped.masked_fill(vocab_map < 0, UNKNOWN_LOGPROB)
            entropy[aligned] = -(teacher_lp.exp() * teacher_lp).sum(-1)
        sorted_probs = self._sorted_probs(part, device) if self.sorted_ranks else None
        return TeacherChunk(log_probs, entropy, aligned, sorted_probs)

    def _sorted_probs(self, part: slice, device: torch.device) -> torch.Tensor:
        """`TeacherChunk.sorted_probs` of the positions `part`: [n, student V]."""
        starts = self.alignment.span_start[part].to(device)
        size = self.vocab_map.shape[0]
        out = torch.full((starts.shape[0], size), torch.nan, device=device)
        rows = starts >= 0
        if rows.any():
            hidden = self.states.hidden[starts[rows].to(self.states.hidden.device)].to(device)
            probs = (self.head(hidden) / self.temperature).softmax(-1)
            ranked = probs.topk(min(size, probs.shape[-1]), dim=-1).values
            out[rows] = torch.nn.functional.pad(ranked, (0, size - ranked.shape[-1]))
        return out


@dataclass
class Scores:
    """What one scoring pass returns, per response token in row-major order."""

    loss: torch.Tensor
    """The loss consumer's sum: a scalar, with gradient when the student states have one
    (0 without a loss)."""
    token_logprobs: torch.Tensor
    """[M] the student's log-prob of each sampled token."""
    measures: dict[str, torch.Tensor]
    """The measures consumer's named values, each [M] (empty without measures)."""


@torch.no_grad()
def student_topk_ids(student: ResponseStates, head: Head, k: int,
                     chunk_size: int = 256) -> torch.Tensor:
    """The student's top-k token ids [M, k] at each position, in id order (ties to the lower id,
    as `topk_indices`): the candidates a served teacher is asked to score. Reuses the states of the
    student's forward pass; only the head runs again, a chunk at a time."""
    parts = []
    for start in range(0, student.hidden.shape[0], chunk_size):
        log_probs = head(student.hidden[start:start + chunk_size]).log_softmax(-1)
        parts.append(topk_indices(log_probs, k).sort(-1).values)
    return torch.cat(parts) if parts else torch.empty(0, k, dtype=torch.long)


def _score_chunk(student_hidden: torch.Tensor, teacher: TeacherChunk, targets: torch.Tensor,
                 part: slice, *, student_head: Head, loss: TokenLoss | None,
                 measures: MeasureFn | None) -> dict[str, Any]:
    student_lp = student_head(student_hidden).log_softmax(-1)
    teacher_lp = teacher.log_probs
    token_lp = student_lp.gather(-1, targets[:, None]).squeeze(-1)
    exact = {} if teacher.entropy is None else {"teacher_entropy": teacher.entropy}
    if teacher.aligned is not None:
        exact["aligned"] = teacher.aligned
    with shared_topk():
        total = (loss.chunk(student_lp, teacher_lp, targets, token_lp, part, teacher.aligned,
                            teacher.sorted_probs)
                 if loss is not None else token_lp.new_zeros(()))
        values = measures(student_lp, teacher_lp, targets, **exact) if measures is not None else {}
    return {"loss": total, "token_lp": token_lp.detach(), "measures": values}


def score(
    student: ResponseStates,
    teacher: ResponseStates | TeacherLogprobs,
    *,
    student_head: Head,
    teacher_head: Head | None = None,
    teacher_temperature: float = 1.0,
    loss: TokenLoss | None = None,
    measures: MeasureFn | None = None,
    chunk_size: int = 256,
    chunks: int = 0,
) -> Scores:
    """Run the student's head over its response states a chunk at a time, beside the teacher's
    log-probs of the same positions (from its states and `teacher_head`, or from any
    `TeacherLogprobs`, e.g. a served teacher), feeding the consumers.

    With a loss and student states that need a gradient, the output head's gradient is
    accumulated here, chunk by chunk; `Scores.loss.backward()` then takes the rest of the way
    through the backbone. Call it once per pass, as for any loss.

    `chunks`: run at least this many chunks, the ones past the states empty. Under several
    processes each head call (and its backward) is a collective (`opd.run.parallel`), so every
    process passes the largest chunk count of any process."""
    if isinstance(teacher, ResponseStates):
        assert teacher_head is not None, "teacher states need the teacher's head"
        teacher = LocalTeacher(teacher, teacher_head, teacher_temperature)
    total = student.hidden.new_zeros((), dtype=torch.float32)
    token_lps: list[torch.Tensor] = []
    columns: dict[str, list[torch.Tensor]] = {}
    device = student.hidden.device
    grad = student.hidden.requires_grad and torch.is_grad_enabled() and loss is not None
    hidden_grad = torch.zeros_like(student.hidden) if grad else None
    needed = -(-student.hidden.shape[0] // chunk_size)
    for index in range(max(needed, chunks)):
        part = slice(index * chunk_size, (index + 1) * chunk_size)
        hidden = student.hidden[part]
        if grad:
            hidden = hidden.detach().requires_grad_(True)
        out = _score_chunk(hidden, teacher.chunk(part, device), student.targets[part], part,
                           student_head=student_head, loss=loss, measures=measures)
        if grad:
            out["loss"].backward()
            hidden_grad[part] = hidden.grad
        total = total + out["loss"].detach()
        token_lps.append(out["token_lp"])
        for name, value in out["measures"].items():
            columns.setdefault(name, []).append(value)
    if grad:
        # Value: the summed loss; gradient with respect to the student's hidden states: the
        # one collected chunk by chunk above.
        carried = (student.hidden * hidden_grad).sum()
        total = total + (carried - carried.detach())
    return Scores(
        loss=total,
        token_logprobs=torch.cat(token_lps) if token_lps else torch.empty(0),
        measures={name: torch.cat(parts) for name, parts in columns.items()},
    )
