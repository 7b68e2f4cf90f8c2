"""The training loop: one loop for OPD, its variants, GRPO and their mix.

Read top to bottom, a step is: take the step's prompts → the student samples its rollouts →
student and teacher score the student's states → objective and measures → AdamW update →
log a line to metrics.jsonl, evaluate and checkpoint when due. On-policy distillation is the
RL loop with a different per-token signal (tinker-cookbook's view), so GRPO is the same loop
with distill_weight 0 and outcome_weight 1.

One process: `opd train …`. Several (gloo on CPU, NCCL on GPUs):
`accelerate launch --num_processes 2 -m opd train …`, the student replicated (`parallel: ddp`)
or sharded (`parallel: fsdp`) by PyTorch (`opd.run.parallel`). Each process takes an equal share of
the step's prompts; losses are normalised by the global token count and gradients summed
across processes, so the update equals the single-process one for the same global batch.
Rollouts are seeded per (step, prompt, sample), so they do not depend on the sharding either.

With `max_staleness: S` > 0 (one process, hf engine) the rollouts come from `opd.run.ahead`'s
worker thread, which samples step t's with the weights after update max(0, t − 1 − S) while the
trainer scores and updates the steps before; the rest of the step is the same. Every record
carries its `staleness`, and every `staleness_meter_every` steps the meter replays the step's
prompts under the current weights and logs what the stale batch changed in the loss and gradient.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from opd import metrics as M
from opd.config.choices import CROSS_TOKENIZER
from opd.config.settings import to_dict
from opd.config.training import TrainConfig, stale_loss_of
from opd.data.prompts import PromptRecord, load_prompts, render_prompt, require_answers, source_of
from opd.errors import OPDError
from opd.evaluation.accuracy import evaluate
from opd.evaluation.verify import get_verifier
from opd.io import check_output_folder, write_text_atomic
from opd.models.loading import context_window, load_training_models, original_config, resolve_dtype
from opd.run.ahead import AheadBatch, RolloutWorker, per_rollout, staleness_bias
from opd.run.cards import model_card
from opd.run.checkpoints import (
    load_checkpoint,
    load_in_flight,
    save_checkpoint,
    save_sharded_optimizer,
    start_checkpoint,
)
from opd.run.folder import Resume, RunFolder
from opd.run.monitor import Monitor
from opd.run.optim import adamw_with_schedule
from opd.run.parallel import (
    check_parallel_settings,
    full_state_dict,
    gathered,
    grad_norm,
    plain_class,
    prepare,
    whole_head,
)
from opd.runtime import Processes, StepHook, is_wrapped, timed
from opd.step.engines import (
    flat_logprobs,
    generate,
    model_length_limit,
    require_engine,
    sampled_token_logprobs,
    vllm_engine,
)
from opd.step.measures import position_bin_edges, token_measures
from opd.step.objectives import StepLoss, TokenLoss
from opd.step.rollout import Rollouts, check_prompts, encode_prompts, pack
from opd.step.scoring import (
    LocalTeacher,
    ResponseStates,
    TeacherLogprobs,
    output_head,
    positions_per_chunk,
    reference_token_logprobs,
    response_states,
    response_token_rows,
    score,
    vocab_size,
)
from opd.step.totals import StepTotals
from opd.teachers.build import Share, Teacher, TextInputs, build_teachers

RESUME_MUST_MATCH = ("student", "teacher", "teachers", "teacher_field", "prompts", "split",
                     "prompt_field", "messages_field", "answer_field", "seed", "prompts_per_step",
                     "samples_per_prompt", "objective", "max_staleness")
"""Settings a resumed run must share with the run it continues (one its config.yaml lacks, from
an older opd, counts as its default)."""


@dataclass(frozen=True)
class BatchCounts:
    """The step's rollouts counted over every process: response tokens, rollouts, truncated
    rollouts and the reward sum (NaN when some prompt has no answer)."""

    tokens: float
    rollouts: float
    truncated: float
    reward: float

    @classmethod
    def summed(cls, rollouts: Rollouts, rewards: torch.Tensor | None,
               procs: Processes) -> BatchCounts:
        counts = torch.tensor(
            [float(rollouts.response_mask.sum()), float(rollouts.input_ids.shape[0]),
             float(rollouts.truncated.sum()),
             float(rewards.sum()) if rewards is not None else math.nan], dtype=torch.float64)
        return cls(*procs.sum(counts).tolist())


def prompt_order(n_prompts: int, seed: int, start: int, count: int) -> list[int]:
    """Prompt indices `start … start + count` of the endless stream of seeded epoch shuffles."""
    order: list[int] = []
    epoch, offset = divmod(start, n_prompts)
    while len(order) < count:
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch))
        order += perm[offset:].tolist()
        epoch, offset = epoch + 1, 0
    return order[:count]


def check_training_prompts(config: TrainConfig, records: Sequence[PromptRecord],
                           tokenizer: Any, teacher_tokenizer: Any = None,
                           eval_records: Sequence[PromptRecord] = ()) -> None:
    """Every prompt renders for the run and fits: the student's (and, with teacher_prompt own or
    a teacher of another tokenizer, the teacher's) rendering within max_prompt_tokens,
    evaluation prompts within the student's context window. Longer prompts are refused, not
    cut."""
    fix = ("raise max_prompt_tokens, or shorten or remove the row (longer prompts are refused "
           "rather than cut)")
    kwargs = config.chat_template_kwargs
    check_prompts(records, tokenizer, config.template, who="the student's rendering",
                  limit=config.max_prompt_tokens, limit_name="max_prompt_tokens", fix=fix,
                  chat_template_kwargs=kwargs)
    own = config.teacher_prompt == "own" or config.objective.name == CROSS_TOKENIZER
    if teacher_tokenizer is not None and own:
        check_prompts(records, teacher_tokenizer, None, who="the teacher's own rendering",
                      limit=config.max_prompt_tokens, limit_name="max_prompt_tokens", fix=fix,
                      chat_template_kwargs=kwargs)
    window = context_window(config.student)
    check_prompts(eval_records, tokenizer, config.template, who="the student's rendering",
                  limit=window, limit_name="the student's context window",
                  fix="shorten or remove the row", chat_template_kwargs=kwargs)


class Trainer:
    """Holds the models, data and optimizer of one run; `run()` trains to max_steps.

    Everything that can be refused is looked at before anything is written: the run folder,
    the prompt files, the models, the rendering of every prompt, the checkpoint to resume from.
    """

    def __init__(self, config: TrainConfig, *, resume: Resume = False,
                 hooks: Sequence[StepHook] = ()) -> None:
        if resume not in (False, True, "auto"):
            raise OPDError(f"resume: must be false, true or 'auto', got {resume!r}")
        self.config = config
        self.monitor = Monitor(config.on_failure, echo=tqdm.write)
        self.hooks = list(hooks)
        self.procs = Processes()
        self.out = Path(config.out)
        self.folder = RunFolder(self.out)
        check_output_folder(self.out, "out")
        self.verify = get_verifier(config.verifier)
        require_engine(config.rollout_engine)
        if not config.prompts:
            raise OPDError("prompts: no prompt file given; pass --prompts FILE")
        self.records = load_prompts(config.prompts, **source_of(config))
        if config.outcome_weight:
            require_answers(self.records, "prompts", "outcome_weight > 0")
        self.eval_records = (load_prompts(config.eval_prompts, "eval_prompts",
                                          **source_of(config, "eval_split"))
                             if config.eval_prompts else [])
        if self.eval_records:
            require_answers(self.eval_records, "eval_prompts", "evaluation")
        if config.prompts_per_step % self.procs.world:
            raise OPDError(
                f"prompts_per_step ({config.prompts_per_step}) must divide evenly over "
                f"{self.procs.world} processes"
            )
        check_parallel_settings(config, self.procs.launched)
        if config.max_staleness and self.procs.launched:
            raise OPDError("max_staleness: rollouts ahead of the update run in one plain "
                           "process (the worker copies an unwrapped student); set "
                           "max_staleness=0 under a distributed launch")
        checkpoint = self._resume_point(resume)
        torch.manual_seed(config.seed)
        self.models = load_training_models(
            config, self.procs.device, str(checkpoint) if checkpoint else config.student
        )
        check_training_prompts(config, self.records, self.models.tokenizer,
                               self.models.teacher_tokenizer, self.eval_records)
        prepare(self.models, config, self.procs.launched)
        self.teachers = build_teachers(config, self.models, self.records, self.procs)
        self.engine = None
        if config.rollout_engine == "vllm":
            self.engine = vllm_engine(
                config.student, dtype=resolve_dtype(config.dtype, self.procs.device),
                max_model_len=model_length_limit(context_window(config.student),
                                                 config.max_prompt_tokens, config.max_new_tokens),
                settings=config.vllm, trust_remote_code=config.trust_remote_code)
        self.params = [p for p in self.models.student.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = adamw_with_schedule(
            self.params, lr=config.lr, weight_decay=config.weight_decay,
            warmup_steps=config.warmup_steps, total_steps=config.max_steps,
            schedule=config.lr_schedule,
        )
        self.state: dict[str, Any] = {"step": 0, "skipped_steps": 0, "initial_accuracy": None}
        if checkpoint:
            self.state = load_checkpoint(checkpoint, self.optimizer, self.scheduler,
                                         self.models.student)
        self.procs.barrier()
        if self.procs.is_main:
            self.folder.start(to_dict(config), resume, checkpoint)
        self.procs.barrier()
        if checkpoint:
            self.monitor.restore(M.read(self.out))
        self.student_head = output_head(self.models.student)
        vocab = vocab_size(self.models.student)
        if config.objective.name == CROSS_TOKENIZER and self.models.teacher is not None:
            vocab = max(vocab, vocab_size(self.models.teacher))  # another vocabulary's chunks
        self.chunk_size = positions_per_chunk(config.chunk_size, vocab)
        self.bin_edges = position_bin_edges(config.max_new_tokens, config.position_bins)
        self.latest_accuracy: float | None = None
        self.ahead: RolloutWorker | None = None
        self.resumed_from = checkpoint

    # -- run folder -----------------------------------------------------------------------
    def _resume_point(self, resume: Resume) -> Path | None:
        """The checkpoint to resume from (None: start at step 0), after refusing to overwrite
        an existing run or to continue one started with other settings; reads, never writes."""
        checkpoint = self.folder.resume_point(resume)
        if checkpoint is None:
            return None
        saved = self.folder.saved_settings(checkpoint)
        settings = to_dict(self.config)
        defaults = to_dict(TrainConfig())
        changed = {k for k in RESUME_MUST_MATCH if saved.get(k, defaults[k]) != settings[k]}
        if changed:
            raise OPDError(
                f"--resume: the run in {str(self.out)!r} was started with other values of "
                f"{sorted(changed)}; resume with the same settings or use a new --out"
            )
        return checkpoint

    # -- one step -------------------------------------------------------------------------
    def sample(self, step: int, indices: list[int], model: torch.nn.Module | None = None,
               tokenizer: Any = None) -> Rollouts:
        """The student's rollouts of the prompts `indices`, seeded per step, prompt and sample
        (`model`, `tokenizer`: the rollout worker's copies instead of the trainer's)."""
        config, tok = self.config, tokenizer or self.models.tokenizer
        texts = [render_prompt(self.records[i].messages, tok, config.template,
                               config.chat_template_kwargs) for i in indices]
        return generate(
            self.engine, model or self.models.student, tok, texts, n=config.samples_per_prompt,
            max_new_tokens=config.max_new_tokens, temperature=config.temperature,
            top_p=config.top_p, seed=config.seed * 1_000_003 + step, prompt_ids=indices,
            max_prompt_tokens=config.max_prompt_tokens,
        )

    def _start_worker(self, first: int) -> RolloutWorker:
        """The rollout worker, its copy of the student at the current weights, queued from
        step `first` (with the batches in flight that the checkpoint resumed from kept)."""
        tokenizer = copy.deepcopy(self.models.tokenizer)  # not shared across threads
        tis = stale_loss_of(self.config) == "tis"

        def sample(model: torch.nn.Module, step: int) -> tuple[Rollouts, list[list[float]] | None]:
            rollouts = self.sample(step, self._step_prompts(step), model, tokenizer)
            if not tis:
                return rollouts, None
            with torch.inference_mode():
                flat = reference_token_logprobs(model, rollouts.input_ids, rollouts.attention_mask,
                                                rollouts.response_mask, self.chunk_size)
            return rollouts, per_rollout(flat, rollouts.response_mask)

        saved = {}
        if self.resumed_from is not None:
            saved = {step: AheadBatch.from_saved(batch)
                     for step, batch in load_in_flight(self.resumed_from).items()}
        worker = RolloutWorker(self.models.student, sample,
                               max_staleness=self.config.max_staleness,
                               max_steps=self.config.max_steps)
        worker.start(first, saved)
        return worker

    def rollouts(self, step: int, indices: list[int]) -> AheadBatch:
        """Step `step`'s rollouts: sampled now by the current weights, or taken from the
        worker that sampled them ahead."""
        if self.ahead is not None:
            return self.ahead.take(step)
        with gathered(self.models.student):
            return AheadBatch(step, step - 1, self.sample(step, indices))

    def _teacher_inputs(self, rollouts: Rollouts, indices: list[int], rows: slice,
                        teacher: Teacher):
        """The teacher's input rows: the student's tokens, or its own prompt rendering; for a
        teacher with another vocabulary, its own prompt rendering and the student's response
        ids, which it re-tokenizes."""
        if teacher.reads_text:
            texts = [render_prompt(self.records[indices[i]].messages, teacher.tokenizer,
                                   chat_template_kwargs=self.config.chat_template_kwargs)
                     for i in rollouts.prompt_index[rows].tolist()]
            return TextInputs(texts, rollouts.response_ids[rows],
                              (~rollouts.truncated[rows]).tolist())
        if self.config.teacher_prompt == "student":
            return (rollouts.input_ids[rows], rollouts.attention_mask[rows],
                    rollouts.response_mask[rows])
        tok = self.models.teacher_tokenizer
        texts = [render_prompt(self.records[indices[i]].messages, tok,
                               chat_template_kwargs=self.config.chat_template_kwargs)
                 for i in rollouts.prompt_index[rows].tolist()]
        prompts = encode_prompts(tok, texts, self.config.max_prompt_tokens)
        return pack(prompts, rollouts.response_ids[rows], tok.pad_token_id)

    def _rewards(self, rollouts: Rollouts, indices: list[int]) -> torch.Tensor | None:
        """The verifier's reward per rollout, or None when some prompt has no answer."""
        answers = [self.records[indices[i]].answer for i in rollouts.prompt_index.tolist()]
        if any(a is None for a in answers):
            return None
        return torch.tensor(
            [float(self.verify(t, a)) for t, a in zip(rollouts.texts, answers, strict=True)]
        )

    def train_step(self, step: int) -> dict[str, Any]:
        """Rollouts → scoring → loss and measures → update; returns the step's record."""
        record: dict[str, Any] = {M.STEP: step}
        indices = self._step_prompts(step)
        with timed(M.TIME_ROLLOUT, record):
            sampled = self.rollouts(step, indices)
        record[M.STALENESS] = step - 1 - sampled.version
        batch, totals = self.backward(sampled.rollouts, indices, record,
                                      sampled.sampler_logprobs)
        every = self.config.staleness_meter_every
        if every and step % every == 0:
            record.update(self.meter(step, indices, totals))
        with timed(M.TIME_UPDATE, record):
            loss, norm = self.update(totals)
        if self.ahead is not None:
            self.ahead.push(step, self.models.student)
        return self.log(record, batch, totals, loss, norm)

    def backward(self, rollouts: Rollouts, indices: list[int], record: dict[str, Any],
                 sampler_logprobs: list[list[float]] | None = None,
                 ) -> tuple[BatchCounts, StepTotals]:
        """The loss of `rollouts` differentiated micro-batch by micro-batch (gradients add up
        in the parameters' .grad); their counts, and the loss and measures in totals."""
        rewards = self._rewards(rollouts, indices)
        batch = BatchCounts.summed(rollouts, rewards, self.procs)
        step_loss = self._step_loss(rollouts, rewards, batch)
        totals = StepTotals(self.bin_edges)
        n_rows = rollouts.input_ids.shape[0]
        micro = self.config.micro_batch or n_rows
        for start in range(0, n_rows, micro):
            self.score(rollouts, indices, slice(start, start + micro), step_loss, totals, record,
                       sampler_logprobs)
        return batch, totals

    def meter(self, step: int, indices: list[int], stale: StepTotals) -> dict[str, float | None]:
        """The staleness meter: the step's prompts sampled again by the current weights, and
        what the stale batch (whose gradient is in .grad, and stays there) changed in the loss
        and the gradient against that fresh batch."""
        stale_grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                       for p in self.params]
        self.optimizer.zero_grad(set_to_none=True)
        with gathered(self.models.student):
            fresh = self.sample(step, indices)
        _, totals = self.backward(fresh, indices, {})
        fresh_grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                       for p in self.params]
        bias = staleness_bias(stale.total_loss(self.procs), totals.total_loss(self.procs),
                              stale_grads, fresh_grads)
        for param, grad in zip(self.params, stale_grads, strict=True):
            param.grad = grad
        return bias

    def _step_prompts(self, step: int) -> list[int]:
        """This process's share of the step's prompt indices."""
        config, procs = self.config, self.procs
        share = config.prompts_per_step // procs.world
        indices = prompt_order(len(self.records), config.seed,
                               (step - 1) * config.prompts_per_step, config.prompts_per_step)
        return indices[procs.rank * share : (procs.rank + 1) * share]

    def _step_loss(self, rollouts: Rollouts, rewards: torch.Tensor | None,
                   batch: BatchCounts) -> StepLoss:
        """The step's loss, normalised by the counts of every process."""
        config = self.config
        return StepLoss.build(
            config.objective, rollouts.response_mask, aggregation=config.loss_aggregation,
            total_tokens=batch.tokens, total_rows=batch.rollouts,
            distill_weight=config.distill_weight, kl_coef=config.kl_penalty,
            outcome_weight=config.outcome_weight, rewards=rewards, groups=rollouts.prompt_index,
            tis_cap=config.tis_cap,
        )

    def score(self, rollouts: Rollouts, indices: list[int], rows: slice, step_loss: StepLoss,
              totals: StepTotals, record: dict[str, Any],
              sampler_logprobs: list[list[float]] | None = None) -> None:
        """One micro-batch: the teachers' and the reference's log-probs, the student's states,
        then each teacher's share through the scoring pass. Its loss is differentiated at once
        (gradients add up over micro-batches); its loss and measures go into `totals`.
        `sampler_logprobs`: the log-probs of the older weights that sampled stale rollouts,
        against which `tis_cap` weighs each token (stale_loss tis)."""
        models = self.models
        shares = self._shares(rollouts, indices, rows)
        with timed(M.TIME_SCORE, record), torch.no_grad():
            early = {i: self._teacher_logprobs(rollouts, indices, rows, None, s)
                     for i, s in enumerate(shares) if s and not s.empty
                     and not s.teacher.reads_student}
            reference_lp = self._reference_logprobs(rollouts, rows)
        with timed(M.TIME_UPDATE, record):
            student_states = response_states(
                models.student, rollouts.input_ids[rows], rollouts.attention_mask[rows],
                rollouts.response_mask[rows],
            )
        with timed(M.TIME_SCORE, record), torch.no_grad():
            teacher_lps = [early[i] if i in early else
                           self._teacher_logprobs(rollouts, indices, rows, student_states, s)
                           for i, s in enumerate(shares)]
        engine_lp = sampled_token_logprobs(rollouts, rows)
        behaviour_lp = flat_logprobs(sampler_logprobs, rows) if sampler_logprobs else engine_lp
        with timed(M.TIME_UPDATE, record):
            token_loss = step_loss.rows(rows, student_states.rows, student_states.hidden.device,
                                        reference_lp, behaviour_lp)
            loss = student_states.hidden.new_zeros((), dtype=torch.float32)
            with whole_head(models.student), whole_head(models.teacher):
                for share, teacher_lp in zip(shares, teacher_lps, strict=True):
                    share_loss, measures, positions = self._score_share(
                        share, student_states, teacher_lp, token_loss, engine_lp)
                    loss = loss + share_loss
                    totals.add_measures(measures, positions, share.name if share else None)
            loss.backward()
            totals.add_loss(loss)

    def update(self, totals: StepTotals) -> tuple[float, float]:
        """Clip the summed gradient and take the AdamW step, skipped (and counted) when the
        loss or the gradient norm is not finite; returns the step's loss and gradient norm."""
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        norm = grad_norm(torch.nn.utils.clip_grad_norm_(self.params, clip))
        loss = totals.total_loss(self.procs)
        if math.isfinite(loss) and math.isfinite(norm):
            self.optimizer.step()
        else:
            self.state["skipped_steps"] += 1
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm

    def log(self, record: dict[str, Any], batch: BatchCounts, totals: StepTotals, loss: float,
            norm: float) -> dict[str, Any]:
        """The step's record: loss, measures (overall, by teacher, by position), gradient norm,
        response length, truncation, reward, learning rate."""
        procs, teachers = self.procs, self.teachers
        if teachers is not None and teachers.names:
            record[M.BY_TEACHER] = totals.teacher_means(procs, teachers.names)
        overall, by_position = totals.means(procs)
        if self.engine is not None:
            overall[M.ROLLOUT_LOGPROB_GAP_MAX] = procs.max(totals.gap_max)
        if teachers is not None and teachers.entropy != "exact":
            record[M.TEACHER_ENTROPY_ESTIMATE] = teachers.entropy
        if teachers is None:
            for name in M.TEACHER_MEASURES:
                overall[name] = None
                by_position.pop(name)
        record.update({
            M.LOSS: loss, **overall, M.GRAD_NORM: norm,
            M.RESPONSE_LENGTH: batch.tokens / batch.rollouts,
            M.TRUNCATION_RATE: batch.truncated / batch.rollouts,
            M.TRAIN_REWARD: None if math.isnan(batch.reward) else batch.reward / batch.rollouts,
            M.LR: self.scheduler.get_last_lr()[0], M.SKIPPED_STEPS: self.state["skipped_steps"],
            M.BY_POSITION: by_position,
        })
        return record

    def _shares(self, rollouts: Rollouts, indices: list[int], rows: slice) -> list[Share | None]:
        """Which teacher scores which rows of the micro-batch (`[None]`: no teacher)."""
        if self.teachers is None:
            return [None]
        token_rows = response_token_rows(rollouts.response_mask[rows]).to(self.procs.device)
        return self.teachers.split([indices[i] for i in rollouts.prompt_index[rows]], token_rows)

    def _teacher_logprobs(self, rollouts: Rollouts, indices: list[int], rows: slice,
                          student: ResponseStates | None, share: Share | None):
        """The log-probs of the teacher of `share` (its rows of the micro-batch); without a
        teacher, or for a teacher with no row here, the student's own (the teacher measures
        are then dropped from the record, or count nothing). `student` is None for a teacher
        that does not read the student's states."""
        if share is not None and student is not None:
            student = student.select(share.tokens)
        if share is None or share.empty:
            hidden = ResponseStates(student.hidden.detach(), student.targets, student.positions,
                                    student.rows)
            return LocalTeacher(hidden, self.student_head,
                                self.config.objective.teacher_temperature)
        inputs = self._teacher_inputs(rollouts, indices, rows, share.teacher)
        if share.rows is not None:
            inputs = (inputs.select(share.rows) if isinstance(inputs, TextInputs)
                      else tuple(part[share.rows] for part in inputs))
        return share.teacher.logprobs(inputs, student, self.student_head)

    def _score_share(self, share: Share | None, student: ResponseStates,
                     teacher_lp: TeacherLogprobs, token_loss: TokenLoss,
                     engine_lp: torch.Tensor | None,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """The tokens of `share` (all of the micro-batch's for None) through the scoring pass:
        their loss, their measures (with the gap to the rollout engine's log-probs `engine_lp`
        when an engine sampled; none for a share that no process has tokens for) and their
        positions in the responses."""
        config, tokens = self.config, share.tokens if share else None
        states = student.select(tokens)
        scores = score(
            states, teacher_lp, student_head=self.student_head, loss=token_loss.select(tokens),
            measures=lambda s, t, y, **exact: token_measures(s, t, y, config.measure_k, **exact),
            chunk_size=self.chunk_size,
            chunks=self.procs.max(-(-states.targets.shape[0] // self.chunk_size)),
        )
        measures = scores.measures
        if engine_lp is not None and measures:
            engine = engine_lp if tokens is None else engine_lp[tokens.cpu()]
            gap = (scores.token_logprobs.cpu() - engine).abs()
            measures = {**measures, M.ROLLOUT_LOGPROB_GAP: gap}
        return scores.loss, measures, states.positions

    def _reference_logprobs(self, rollouts: Rollouts, rows: slice) -> torch.Tensor | None:
        """The reference model's log-probs of the rows' response tokens (None without one)."""
        if self.models.reference is None:
            return None
        return reference_token_logprobs(
            self.models.reference, rollouts.input_ids[rows], rollouts.attention_mask[rows],
            rollouts.response_mask[rows], self.chunk_size)

    # -- evaluation and checkpoints -------------------------------------------------------
    def evaluate(self) -> float | None:
        """avg@n on eval_prompts (main process), or None without an evaluation set."""
        if not self.eval_records:
            return None
        accuracy = torch.zeros(1, dtype=torch.float64)
        with gathered(self.models.student):
            if self.procs.is_main:
                cfg = self.config
                result = evaluate(
                    self.models.student, self.models.tokenizer, self.eval_records,
                    n=cfg.eval_samples_per_prompt, engine=self.engine,
                    temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                    max_new_tokens=cfg.max_new_tokens, verifier=cfg.verifier,
                    template=cfg.template, seed=cfg.seed,
                    chat_template_kwargs=cfg.chat_template_kwargs,
                )
                accuracy[0] = result.accuracy
        self.latest_accuracy = float(self.procs.sum(accuracy)[0])
        return self.latest_accuracy

    def checkpoint(self, step: int, record: dict[str, Any] | None = None) -> None:
        """A checkpoint folder with its model card (the measures of `record`, the step's). With
        the student wrapped, every process takes part: the weights are gathered to the main
        process and each process writes its share of the optimizer state."""
        self.procs.barrier()
        student, sharded = self.models.student, is_wrapped(self.models.student)
        model_state = full_state_dict(student) if sharded else None
        if sharded:
            if self.procs.is_main:
                start_checkpoint(self.out, step)
            self.procs.barrier()
            save_sharded_optimizer(self.out, step, student, self.optimizer)
            self.procs.barrier()
        if self.procs.is_main:
            self.state["step"] = step
            self.state["consumed_prompts"] = step * self.config.prompts_per_step
            card = model_card(self.config, step=step, record=record,
                              initial_accuracy=self.state.get("initial_accuracy"),
                              accuracy=self.latest_accuracy)
            in_flight = ({s: b.saved() for s, b in self.ahead.pending(step).items()}
                         if self.ahead is not None else None)
            with original_config(self.models.student_dropout), plain_class(student):
                save_checkpoint(
                    self.out, step, student, self.models.tokenizer,
                    None if sharded else self.optimizer, self.scheduler,
                    {k: v for k, v in self.state.items() if k != "step"},
                    self.config.keep_checkpoints, settings=to_dict(self.config), card=card,
                    model_state=model_state, in_flight=in_flight,
                )
        self.procs.barrier()

    # -- the loop -------------------------------------------------------------------------
    def _steps(self, bar: Any) -> tuple[dict[str, Any], int | None]:
        """The steps of `bar`, each logged, evaluated and checkpointed when due; the last
        step's record, and the step a stop was asked at (None: ran to the end)."""
        config = self.config
        record: dict[str, Any] = {}
        for step in bar:
            record = self.train_step(step)
            last = step == config.max_steps
            due = bool(config.eval_every) and step % config.eval_every == 0
            if self.eval_records and (due or last):
                with timed(M.TIME_EVAL, record):
                    record[M.ACCURACY] = self.evaluate()
            alerts = self.monitor.observe(record)
            if alerts:
                record[M.ALERTS] = [asdict(a) for a in alerts]
            stop = any(a.stops for a in alerts) and self.monitor.stops
            stop = any([hook.on_step(record) for hook in self.hooks]) or stop
            if self.procs.is_main:
                M.append(self.out, record)
                bar.set_postfix(_postfix(record), refresh=False)
            if step % config.save_every == 0 or last or stop:
                self.checkpoint(step, record)
            if stop:
                return record, step
        return record, None

    def run(self) -> dict[str, Any]:
        config = self.config
        first = self.state["step"] + 1
        if first == 1 and self.eval_records:
            self.state["initial_accuracy"] = self.evaluate()
        bar = tqdm(
            range(first, config.max_steps + 1), initial=first - 1, total=config.max_steps,
            disable=not (config.progress and self.procs.is_main), desc="opd train",
            dynamic_ncols=True,
        )
        if config.max_staleness:
            self.ahead = self._start_worker(first)
        try:
            record, stopped_by = self._steps(bar)
        finally:
            if self.ahead is not None:
                self.ahead.close()
                self.ahead = None
        bar.close()
        checkpoints = self.folder.complete_checkpoints()
        summary = {
            "steps": record.get(M.STEP, self.state["step"]),
            "stopped_early_at": stopped_by,
            "initial_accuracy": self.state.get("initial_accuracy"),
            "final_accuracy": record.get(M.ACCURACY),
            "skipped_steps": self.state["skipped_steps"],
            "final_checkpoint": str(checkpoints[-1]) if checkpoints else None,
            "alerts": [asdict(a) for a in self.monitor.fired.values()],
        }
        if self.procs.is_main:
            write_text_atomic(self.folder.summary, json.dumps(summary, indent=2))
        for hook in self.hooks:
            hook.on_end(summary)
        return summary


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    keys = {M.LOSS: "loss", M.OVERLAP_RATIO: "overlap", M.ENTROPY_GAP: "H-gap",
            M.TRAIN_REWARD: "reward", M.ACCURACY: "acc"}
    return {short: f"{record[k]:.3g}" for k, short in keys.items()
            if isinstance(record.get(k), float)}


def run_training(config: TrainConfig, *, resume: Resume = False,
                 hooks: Sequence[StepHook] = ()) -> dict[str, Any]:
    """Train per `config` (resuming from the last checkpoint if asked); returns the summary."""
    return Trainer(config, resume=resume, hooks=hooks).run()
