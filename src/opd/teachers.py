"""The trainer's teacher behind one interface: in process (a model folder) or served (a URL of
`opd serve-teacher`). Either turns a micro-batch's teacher inputs and the student's states into
`TeacherLogprobs` for the scoring pass."""

from __future__ import annotations

from typing import Protocol

import torch

from opd.config import TrainConfig
from opd.models import TrainingModels
from opd.scoring import Head, LocalTeacher, ResponseStates, TeacherLogprobs, output_head, response_states
from opd.teacher_service.client import ServedTeacher, TeacherClient, check_served_vocabulary
from opd.teacher_service.protocol import is_url, vocabulary_fingerprint

STUDENT_CANDIDATE_SETS = ("student", "union", "symmetric-difference")
"""Candidate sets that hold the student's top-k tokens, whose teacher log-probs a served
teacher must be asked for."""


class Teacher(Protocol):
    def logprobs(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 student: ResponseStates, student_head: Head) -> TeacherLogprobs: ...


class InProcessTeacher:
    """A teacher model loaded in this process: its backbone's states and its head."""

    def __init__(self, model: torch.nn.Module, temperature: float) -> None:
        self.model, self.head, self.temperature = model, output_head(model), temperature

    @torch.no_grad()
    def logprobs(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 student: ResponseStates, student_head: Head) -> TeacherLogprobs:
        return LocalTeacher(response_states(self.model, *inputs), self.head, self.temperature)


def build_teacher(config: TrainConfig, models: TrainingModels) -> Teacher | None:
    """The run's teacher (None without distillation); a served one is asked for its model
    first, and refused when its vocabulary is not the student's."""
    objective = config.objective
    if not config.distill_weight:
        return None
    if not is_url(config.teacher):
        return InProcessTeacher(models.teacher, objective.teacher_temperature)
    vocab_size = int(models.student.get_output_embeddings().weight.shape[0])
    client = TeacherClient(config.teacher, timeout=config.teacher_timeout)
    check_served_vocabulary(client.info(), vocabulary_fingerprint(models.tokenizer), vocab_size,
                            config.teacher)
    uses_student_set = (objective.name in ("topk", "subset_kl")
                        and objective.strategy in STUDENT_CANDIDATE_SETS)
    k = max(config.measure_k, objective.k if objective.name in ("topk", "subset_kl") else 1)
    return ServedTeacher(client, vocab_size=vocab_size, k=min(k, vocab_size),
                         candidates_k=min(objective.k, vocab_size) if uses_student_set else 0,
                         temperature=objective.teacher_temperature, chunk_size=config.chunk_size)
