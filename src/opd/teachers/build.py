"""The trainer's teachers behind one interface: in process (a model folder) or served (a URL of
`opd serve-teacher`), one for the run or one per value of a prompt field (`teachers`). Each
turns a micro-batch's teacher inputs and the student's states into `TeacherLogprobs` for the
scoring pass; `Teachers.split` says which rows each teacher scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from opd.config.choices import CROSS_TOKENIZER
from opd.config.training import TrainConfig
from opd.data.prompts import PromptRecord
from opd.errors import OPDError
from opd.io import is_url
from opd.models.loading import TrainingModels, check_same_vocabulary, load_model, load_tokenizer
from opd.runtime import Processes
from opd.step.alignment import align_tokens, char_ends, vocabulary_map
from opd.step.rollout import encode_prompts, pack, pad_token_id
from opd.step.scoring import (
    AlignedTeacher,
    Head,
    LocalTeacher,
    ResponseStates,
    TeacherLogprobs,
    output_head,
    positions_per_chunk,
    response_states,
    vocab_size,
)
from opd.teachers.client import (
    ServedTeacher,
    TeacherClient,
    check_served_capabilities,
    check_served_vocabulary,
)
from opd.teachers.protocol import vocabulary_fingerprint

STUDENT_CANDIDATE_SETS = ("student", "union", "symmetric-difference")
"""Candidate sets that hold the student's top-k tokens, whose teacher log-probs a served
teacher must be asked for."""

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""A micro-batch's teacher input ids, attention mask and response mask."""


class Teacher(Protocol):
    entropy: str
    """exact, or topk: its teacher entropies are estimates from its top-k (a served vllm
    teacher)."""
    reads_student: bool
    """Whether `logprobs` reads the student's states. One that does not is passed None and
    asked before the student's forward pass: on the CPU a teacher's forward pass run while the
    student's graph is held takes ~30% longer (its memory is freshly faulted in)."""
    reads_text: bool
    """Whether `logprobs` reads `TextInputs` (a teacher with another vocabulary) rather than
    token rows of the student's vocabulary."""

    def logprobs(self, inputs: Inputs, student: ResponseStates | None,
                 student_head: Head) -> TeacherLogprobs: ...


class InProcessTeacher:
    """A teacher model loaded in this process: its backbone's states and its head."""

    entropy = "exact"
    reads_student = False
    reads_text = False

    def __init__(self, model: torch.nn.Module, temperature: float) -> None:
        self.model, self.head, self.temperature = model, output_head(model), temperature

    @torch.no_grad()
    def logprobs(self, inputs: Inputs, student: ResponseStates | None,
                 student_head: Head) -> TeacherLogprobs:
        return LocalTeacher(response_states(self.model, *inputs), self.head, self.temperature)


@dataclass(frozen=True)
class TextInputs:
    """What a teacher with another vocabulary reads of a micro-batch: its own rendering of each
    row's prompt and the student's response ids, which it decodes and re-tokenizes."""

    prompts: list[str]
    responses: list[list[int]]
    ended: list[bool]
    """Whether each response ends with the student's stop token (the teacher then scores its
    counterpart, or its own EOS, in its place)."""

    def select(self, rows: torch.Tensor) -> TextInputs:
        """The rows `rows` only."""
        picked = rows.tolist()
        return TextInputs([self.prompts[i] for i in picked], [self.responses[i] for i in picked],
                          [self.ended[i] for i in picked])


def text_decoder(tokenizer) -> Callable[[Sequence[int]], str]:
    """ids → the text they stand for, special tokens left out (as the rollouts' texts)."""
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True,
                                        clean_up_tokenization_spaces=False)


class RetokenizingTeacher:
    """A teacher model with another tokenizer, in this process: it re-tokenizes the student's
    response text with its own tokenizer after its own rendering of the prompt, and its
    log-probs reach the student's positions through the alignment of the two tokenizations
    (`opd.step.alignment`)."""

    entropy = "exact"
    reads_student = False
    reads_text = True

    def __init__(self, model: torch.nn.Module, tokenizer, student_tokenizer, temperature: float,
                 student_vocab: int, max_prompt_tokens: int | None = None,
                 sorted_ranks: bool = False) -> None:
        self.model, self.head, self.temperature = model, output_head(model), temperature
        self.sorted_ranks = sorted_ranks
        self.tokenizer, self.student_tokenizer = tokenizer, student_tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.vocab_map = vocabulary_map(student_tokenizer, tokenizer, student_vocab,
                                        vocab_size(model))

    def _stop(self, student_stop: int) -> int:
        """The teacher's token in place of the student's stop token: its counterpart through
        the vocabulary map (EOS for EOS, an end-of-turn token of the same name), else its EOS."""
        mapped = int(self.vocab_map[student_stop])
        return mapped if mapped >= 0 else self.tokenizer.eos_token_id

    @torch.no_grad()
    def logprobs(self, inputs: TextInputs, student: ResponseStates | None,
                 student_head: Head) -> TeacherLogprobs:
        student_decode = text_decoder(self.student_tokenizer)
        teacher_decode = text_decoder(self.tokenizer)
        texts = [student_decode(ids) for ids in inputs.responses]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        teacher_rows = [[*ids, self._stop(student_ids[-1])] if ended else ids
                        for ids, student_ids, ended in zip(encoded, inputs.responses,
                                                           inputs.ended, strict=True)]
        alignment = align_tokens(
            inputs.responses, teacher_rows,
            [char_ends(student_decode, ids, t) for ids, t in zip(inputs.responses, texts,
                                                                strict=True)],
            [char_ends(teacher_decode, ids, t) for ids, t in zip(teacher_rows, texts,
                                                                strict=True)],
            self.vocab_map)
        prompts = encode_prompts(self.tokenizer, inputs.prompts, self.max_prompt_tokens)
        packed = pack(prompts, teacher_rows, pad_token_id(self.tokenizer))
        targets = torch.tensor([i for ids in inputs.responses for i in ids], dtype=torch.long)
        return AlignedTeacher(response_states(self.model, *packed), self.head, alignment,
                              self.vocab_map, targets, self.temperature, self.sorted_ranks)


@dataclass
class Share:
    """The part of a micro-batch one teacher scores: its rows and their response tokens (None:
    all of them)."""

    name: str | None
    teacher: Teacher
    rows: torch.Tensor | None
    tokens: torch.Tensor | None

    @property
    def empty(self) -> bool:
        """No row of this micro-batch is this teacher's (it is still scored, with nothing,
        so that every process calls the student's head equally often)."""
        return self.rows is not None and self.rows.numel() == 0


class Teachers:
    """The run's teachers: one (`name` None), or one per value of `teacher_field`."""

    def __init__(self, by_name: dict[str | None, Teacher], of_prompt: list[str] | None) -> None:
        self.by_name, self.of_prompt = by_name, of_prompt

    @property
    def entropy(self) -> str:
        """exact, or topk when the teacher entropies (and entropy gaps) are top-k estimates;
        `build_teachers` refuses teachers of both kinds in one run."""
        return next(iter(self.by_name.values())).entropy

    @property
    def names(self) -> list[str]:
        """The teachers' names when there are several (empty with one)."""
        return sorted(n for n in self.by_name if n is not None)

    def split(self, prompts: Sequence[int], token_rows: torch.Tensor) -> list[Share]:
        """Who scores what: `prompts` is the prompt (record index) of each micro-batch row,
        `token_rows` [M] the row of each response token. With several teachers every teacher
        gets a share, in one order, even an empty one."""
        if self.of_prompt is None:
            return [Share(None, self.by_name[None], None, None)]
        names = [self.of_prompt[p] for p in prompts]
        shares = []
        for name in self.names:
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], dtype=torch.long)
            tokens = torch.isin(token_rows, rows.to(token_rows.device))
            shares.append(Share(name, self.by_name[name], rows, tokens))
        return shares


def teacher_of_each_prompt(records: Sequence[PromptRecord], field: str,
                            teachers: dict[str, str]) -> list[str]:
    """The `teachers` key of each prompt (its `field` value); a value without a teacher stops
    with the row named."""
    names = []
    for record in records:
        value = record.meta.get(field)
        if str(value) not in teachers:
            raise OPDError(f"teachers: {record.source or 'a prompt'} has {field} {value!r}, which "
                           f"no teacher is given for (teachers: {sorted(teachers)}); add it to "
                           "teachers or remove the row")
        names.append(str(value))
    return names


def _load(path: str, role: str, config: TrainConfig, models: TrainingModels,
          device: torch.device) -> Teacher:
    objective = config.objective
    if not is_url(path):
        cross = objective.name == CROSS_TOKENIZER
        if path == config.teacher and models.teacher is not None:
            model, tokenizer = models.teacher, models.teacher_tokenizer
        else:
            tokenizer = load_tokenizer(path, role, config.trust_remote_code)
            if not cross:
                check_same_vocabulary(models.tokenizer, tokenizer, config.student, path)
            model = load_model(path, role, trainable=False, device=device, dtype=config.dtype,
                               trust_remote_code=config.trust_remote_code)
        if cross:
            return RetokenizingTeacher(model, tokenizer, models.tokenizer,
                                       objective.teacher_temperature, vocab_size(models.student),
                                       config.max_prompt_tokens, objective.sorted_weight > 0)
        return InProcessTeacher(model, objective.teacher_temperature)
    vocab = vocab_size(models.student)
    client = TeacherClient(path, timeout=config.teacher_timeout)
    info = client.info()
    check_served_vocabulary(info, vocabulary_fingerprint(models.tokenizer), vocab, path)
    top = objective.name in ("topk", "subset_kl")
    uses_student_set = top and objective.strategy in STUDENT_CANDIDATE_SETS
    check_served_capabilities(info, path, candidates=uses_student_set,
                              temperature=objective.teacher_temperature)
    k = max(config.measure_k, objective.k if top else 1)
    return ServedTeacher(client, vocab_size=vocab, k=min(k, vocab),
                         candidates_k=min(objective.k, vocab) if uses_student_set else 0,
                         temperature=objective.teacher_temperature,
                         chunk_size=positions_per_chunk(config.chunk_size, vocab),
                         entropy=info.get("entropy", "exact"))


def build_teachers(config: TrainConfig, models: TrainingModels,
                   records: Sequence[PromptRecord], procs: Processes) -> Teachers | None:
    """The run's teachers (None without distillation). Every prompt's teacher is known, and
    every teacher loaded or asked for its model (a served one with another vocabulary is
    refused), before the first step. Several teachers from folders are whole copies on each
    process (`teacher_parallel` applies to a single `teacher`)."""
    if not config.distill_weight:
        return None
    served = any(is_url(t) for t in (config.teacher, *config.teachers.values()))
    if served and config.parallel == "fsdp" and procs.world > 1:
        raise OPDError("parallel: a served teacher works with parallel ddp (or one process) so "
                       "far: asking it for the student's candidates runs the sharded output "
                       "head a different number of times on each process; set parallel=ddp")
    device = procs.device
    if not config.teachers:
        return Teachers({None: _load(config.teacher, "teacher", config, models, device)}, None)
    of_prompt = teacher_of_each_prompt(records, config.teacher_field, config.teachers)
    by_name: dict[str | None, Teacher] = {
        name: _load(path, f"teachers.{name}", config, models, device)
        for name, path in config.teachers.items() if name in set(of_prompt)}
    kinds = {name: teacher.entropy for name, teacher in by_name.items()}
    if len(set(kinds.values())) > 1:
        estimated = sorted(str(n) for n, kind in kinds.items() if kind != "exact")
        raise OPDError(f"teachers: the entropies of {', '.join(estimated)} are top-k estimates "
                       "(a vllm backend), the others' exact; teacher_entropy would mix the two: "
                       "serve every teacher with the same backend")
    return Teachers(by_name, of_prompt)
