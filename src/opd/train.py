"""The training loop: one loop for OPD, its variants, GRPO and their mix.

Read top to bottom, a step is: take the step's prompts → the student samples its rollouts →
student and teacher score the student's states → objective and measures → AdamW update →
log a line to metrics.jsonl, evaluate and checkpoint when due. On-policy distillation is the
RL loop with a different per-token signal (tinker-cookbook's view), so GRPO is the same loop
with distill_weight 0 and outcome_weight 1.

One process: `opd train …`. Several (DDP over gloo on CPU, NCCL on GPUs):
`accelerate launch --num_processes 2 -m opd train …`. Each process takes an equal share of
the step's prompts; losses are normalised by the global token count and gradients summed
across processes, so the update equals the single-process one for the same global batch.
Rollouts are seeded per (step, prompt, sample), so they do not depend on the sharding either.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from tqdm.auto import tqdm

from opd.checkpoints import (
    append_jsonl,
    complete_checkpoints,
    load_trainer_state,
    read_jsonl,
    save_checkpoint,
    set_rng_state,
    truncate_metrics,
)
from opd.config import TrainConfig, config_to_dict
from opd.data.prompts import PromptRecord, load_prompts, render_prompt
from opd.errors import OPDError
from opd.evaluate import evaluate
from opd.measures import MEASURES, means_from_totals, position_bin_edges, position_totals
from opd.models import check_same_vocabulary, load_model, load_tokenizer
from opd.monitor import Monitor
from opd.objectives import aggregation_weights, group_advantages
from opd.report import write_run_report
from opd.rollout import Rollouts, encode_prompts, generate_rollouts, pack
from opd.scoring import ResponseStates, TokenTerms, output_head, response_states, score_and_loss
from opd.verify import get_verifier

TEACHER_MEASURES = tuple(m for m in MEASURES if m != "student_entropy")
StepHook = Callable[[dict[str, Any]], bool | None]


@contextlib.contextmanager
def timed(stage: str, metrics: dict[str, Any]) -> Iterator[None]:
    """Add the block's wall time to metrics[f"time_{stage}"]."""
    start = time.perf_counter()
    yield
    metrics[f"time_{stage}"] = metrics.get(f"time_{stage}", 0.0) + time.perf_counter() - start


class Processes:
    """The few distributed operations the loop needs; a no-op for a single process."""

    def __init__(self) -> None:
        from accelerate import PartialState

        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.device = self.state.device
        self.is_main = self.state.is_main_process
        if self.world > 1 and self.device.type == "cpu":
            # Processes sharing a few cores must not each spin up all of them.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor)
        return tensor

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def prompt_order(n_prompts: int, seed: int, start: int, count: int) -> list[int]:
    """Prompt indices `start … start + count` of the endless stream of seeded epoch shuffles."""
    order: list[int] = []
    epoch, offset = divmod(start, n_prompts)
    while len(order) < count:
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch))
        order += perm[offset:].tolist()
        epoch, offset = epoch + 1, 0
    return order[:count]


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        if config.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


@dataclass
class Models:
    student: torch.nn.Module
    teacher: torch.nn.Module | None
    reference: torch.nn.Module | None
    tokenizer: Any
    teacher_tokenizer: Any


def load_models(config: TrainConfig, device: torch.device, student_path: str) -> Models:
    """Student (trainable, optionally LoRA), teacher and reference (frozen)."""
    tokenizer = load_tokenizer(config.student, "student", config.trust_remote_code)
    teacher = teacher_tokenizer = None
    if config.distill_weight:
        teacher_tokenizer = load_tokenizer(config.teacher, "teacher", config.trust_remote_code)
        check_same_vocabulary(tokenizer, teacher_tokenizer, config.student, config.teacher)
    common = dict(device=device, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    if config.lora_rank and student_path != config.student:
        student = _load_lora_checkpoint(config, student_path, common)
    else:
        student = load_model(student_path, "student", trainable=True, **common)
        if config.lora_rank:
            student = _add_lora(student, config.lora_rank)
    if config.distill_weight:
        teacher = load_model(config.teacher, "teacher", trainable=False, **common)
    reference = (
        load_model(config.student, "reference", trainable=False, **common)
        if config.kl_penalty else None
    )
    return Models(student, teacher, reference, tokenizer, teacher_tokenizer)


def _peft():
    try:
        import peft
    except ImportError as err:
        raise OPDError("lora_rank > 0 needs peft: pip install 'opd[peft]'") from err
    return peft


def _add_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    return peft.get_peft_model(model, config)


def _load_lora_checkpoint(config: TrainConfig, path: str, common: dict) -> torch.nn.Module:
    base = load_model(config.student, "student", trainable=True, **common)
    return _peft().PeftModel.from_pretrained(base, path, is_trainable=True)


def _records_need_answers(records: Sequence[PromptRecord], what: str, field: str) -> None:
    missing = next((i for i, r in enumerate(records) if r.answer is None), None)
    if missing is not None:
        raise OPDError(
            f"{field}: row {missing + 1} has no 'answer'; {what} needs an answer on every row"
        )


class Trainer:
    """Holds the models, data and optimizer of one run; `run()` trains to max_steps."""

    def __init__(self, config: TrainConfig, *, resume: bool = False,
                 hooks: Sequence[StepHook] = ()) -> None:
        self.config = config
        self.monitor = Monitor(config.on_failure, echo=tqdm.write)
        self.hooks = [self.monitor, *hooks]
        self.procs = Processes()
        self.out = Path(config.out)
        self.metrics_path = self.out / "metrics.jsonl"
        self.records = load_prompts(config.prompts) if config.prompts else []
        if not self.records:
            raise OPDError("prompts: no prompt file given; pass --prompts FILE")
        if config.outcome_weight:
            _records_need_answers(self.records, "outcome_weight > 0", "prompts")
        self.eval_records = load_prompts(config.eval_prompts) if config.eval_prompts else []
        if self.eval_records:
            _records_need_answers(self.eval_records, "evaluation", "eval_prompts")
        if config.prompts_per_step % self.procs.world:
            raise OPDError(
                f"prompts_per_step ({config.prompts_per_step}) must divide evenly over "
                f"{self.procs.world} processes"
            )
        checkpoint = self._prepare_run_folder(resume)
        torch.manual_seed(config.seed)
        self.models = load_models(
            config, self.procs.device, str(checkpoint) if checkpoint else config.student
        )
        self.verify = get_verifier(config.verifier)
        self.params = [p for p in self.models.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.state: dict[str, Any] = {"step": 0, "skipped_steps": 0, "initial_accuracy": None}
        if checkpoint:
            self.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt"))
            self.scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt"))
            set_rng_state(torch.load(checkpoint / "rng.pt", weights_only=False))
            self.state = load_trainer_state(checkpoint)
        self.student_head = output_head(self.models.student)
        teacher = self.models.teacher or self.models.student
        self.teacher_head = output_head(teacher)
        self.bin_edges = position_bin_edges(config.max_new_tokens, config.position_bins)

    # -- run folder -----------------------------------------------------------------------
    def _prepare_run_folder(self, resume: bool) -> Path | None:
        """The checkpoint to resume from, after refusing to overwrite an existing run."""
        checkpoints = complete_checkpoints(self.out)
        has_run = self.metrics_path.exists() or bool(checkpoints)
        if has_run and not resume:
            raise OPDError(
                f"out: {str(self.out)!r} already holds a run; pass --resume to continue it "
                "or choose a new --out folder (nothing was changed)"
            )
        if resume and checkpoints:
            saved = yaml.safe_load((self.out / "config.yaml").read_text())
            changed = {
                k for k in ("student", "teacher", "prompts", "seed", "prompts_per_step",
                            "rollouts_per_prompt", "objective")
                if saved.get(k) != getattr(self.config, k)
            }
            if changed:
                raise OPDError(
                    f"--resume: the run in {str(self.out)!r} was started with other values of "
                    f"{sorted(changed)}; resume with the same settings or use a new --out"
                )
        self.procs.barrier()
        if self.procs.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.config)))
            if checkpoints and resume:
                truncate_metrics(self.metrics_path, load_trainer_state(checkpoints[-1])["step"])
            elif resume:
                self.metrics_path.unlink(missing_ok=True)
        self.procs.barrier()
        return checkpoints[-1] if resume and checkpoints else None

    # -- one step -------------------------------------------------------------------------
    def _rollouts(self, step: int, indices: list[int]) -> Rollouts:
        config, tok = self.config, self.models.tokenizer
        texts = [render_prompt(self.records[i].messages, tok, config.template) for i in indices]
        return generate_rollouts(
            self.models.student, tok, texts, n=config.rollouts_per_prompt,
            max_new_tokens=config.max_new_tokens, temperature=config.temperature,
            top_p=config.top_p, seed=config.seed * 1_000_003 + step, prompt_ids=indices,
            max_prompt_tokens=config.max_prompt_tokens,
        )

    def _teacher_inputs(self, rollouts: Rollouts, indices: list[int], rows: slice):
        """The teacher's input rows: the student's tokens, or its own prompt rendering."""
        if self.config.teacher_prompt == "student":
            return (rollouts.input_ids[rows], rollouts.attention_mask[rows],
                    rollouts.response_mask[rows])
        tok = self.models.teacher_tokenizer
        texts = [render_prompt(self.records[indices[i]].messages, tok)
                 for i in rollouts.prompt_index[rows].tolist()]
        prompts = encode_prompts(tok, texts, self.config.max_prompt_tokens)
        return pack(prompts, rollouts.response_ids[rows], tok.pad_token_id)

    def train_step(self, step: int) -> dict[str, Any]:
        config, procs, models = self.config, self.procs, self.models
        metrics: dict[str, Any] = {"step": step}
        share = config.prompts_per_step // procs.world
        global_indices = prompt_order(
            len(self.records), config.seed, (step - 1) * config.prompts_per_step,
            config.prompts_per_step,
        )
        indices = global_indices[procs.rank * share : (procs.rank + 1) * share]
        with timed("rollout", metrics):
            rollouts = self._rollouts(step, indices)

        n = rollouts.input_ids.shape[0]
        answers = [self.records[indices[i]].answer for i in rollouts.prompt_index.tolist()]
        rewards = None
        if all(a is not None for a in answers):
            rewards = torch.tensor(
                [float(self.verify(t, a)) for t, a in zip(rollouts.texts, answers, strict=True)]
            )
        advantages = None
        if config.outcome_weight:
            advantages = config.outcome_weight * group_advantages(rewards, rollouts.prompt_index)

        counts = procs.sum(torch.tensor(
            [float(rollouts.response_mask.sum()), float(n), float(rollouts.truncated.sum()),
             float(rewards.sum()) if rewards is not None else math.nan], dtype=torch.float64,
        )).tolist()
        total_tokens, total_rows = counts[0], counts[1]
        weights = aggregation_weights(
            rollouts.response_mask, config.loss_aggregation, total_tokens, total_rows
        )
        micro = config.micro_batch or n
        loss_total = 0.0
        sums = counts_by_bin = None
        for start in range(0, n, micro):
            rows = slice(start, start + micro)
            with timed("score", metrics), torch.no_grad():
                teacher_states = self._teacher_states(rollouts, indices, rows)
                reference_lp = self._reference_token_lp(rollouts, rows)
            with timed("update", metrics):
                student_states = response_states(
                    models.student, rollouts.input_ids[rows], rollouts.attention_mask[rows],
                    rollouts.response_mask[rows],
                )
                if teacher_states is None:
                    teacher_states = ResponseStates(
                        student_states.hidden.detach(), student_states.targets,
                        student_states.positions, student_states.rows,
                    )
                predicts = rollouts.response_mask[rows][:, 1:]
                terms = TokenTerms(
                    weight=weights[rows][:, 1:][predicts].to(student_states.hidden.device),
                    advantage=None if advantages is None else advantages[rows][
                        student_states.rows.cpu()].to(student_states.hidden.device),
                    reference_lp=reference_lp,
                    distill_weight=config.distill_weight,
                    kl_coef=config.kl_penalty,
                )
                loss, _, measures = score_and_loss(
                    student_states, teacher_states, student_head=self.student_head,
                    teacher_head=self.teacher_head, terms=terms,
                    objective=config.objective_config(),
                    teacher_temperature=config.teacher_temperature,
                    measure_k=config.measure_k, chunk_size=config.chunk_size,
                )
                loss.backward()
                loss_total += float(loss.detach())
            part_sums, part_counts = position_totals(
                measures, student_states.positions, self.bin_edges
            )
            sums = part_sums if sums is None else sums + part_sums
            counts_by_bin = part_counts if counts_by_bin is None else counts_by_bin + part_counts

        with timed("update", metrics):
            procs.sum_gradients(self.params)
            clip = config.grad_clip if config.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
            loss_total = float(procs.sum(torch.tensor(loss_total, dtype=torch.float64)))
            if math.isfinite(loss_total) and math.isfinite(grad_norm):
                self.optimizer.step()
            else:
                self.state["skipped_steps"] += 1
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

        sums, counts_by_bin = procs.sum(sums), procs.sum(counts_by_bin)
        overall, by_position = means_from_totals(MEASURES, sums.cpu(), counts_by_bin.cpu())
        if models.teacher is None:
            for name in TEACHER_MEASURES:
                overall[name] = None
                by_position.pop(name)
        metrics.update(
            loss=loss_total, **overall, grad_norm=grad_norm,
            response_length=total_tokens / total_rows, truncation_rate=counts[2] / total_rows,
            train_reward=None if math.isnan(counts[3]) else counts[3] / total_rows,
            lr=self.scheduler.get_last_lr()[0], skipped_steps=self.state["skipped_steps"],
            by_position=by_position,
        )
        return metrics

    def _teacher_states(self, rollouts: Rollouts, indices: list[int], rows: slice):
        if self.models.teacher is None:
            return None
        ids, attention, response = self._teacher_inputs(rollouts, indices, rows)
        return response_states(self.models.teacher, ids, attention, response)

    def _reference_token_lp(self, rollouts: Rollouts, rows: slice) -> torch.Tensor | None:
        if self.models.reference is None:
            return None
        states = response_states(
            self.models.reference, rollouts.input_ids[rows], rollouts.attention_mask[rows],
            rollouts.response_mask[rows],
        )
        head = output_head(self.models.reference)
        return torch.cat([
            head(h).log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)
            for h, t in zip(states.hidden.split(self.config.chunk_size),
                            states.targets.split(self.config.chunk_size), strict=True)
        ])

    # -- evaluation and checkpoints -------------------------------------------------------
    def evaluate(self) -> float | None:
        """avg@n on eval_prompts (main process), or None without an evaluation set."""
        if not self.eval_records:
            return None
        accuracy = torch.zeros(1, dtype=torch.float64)
        if self.procs.is_main:
            cfg = self.config
            result = evaluate(
                self.models.student, self.models.tokenizer, self.eval_records, n=cfg.eval_n,
                temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                max_new_tokens=cfg.max_new_tokens, verifier=cfg.verifier, template=cfg.template,
                seed=cfg.seed,
            )
            accuracy[0] = result.accuracy
        return float(self.procs.sum(accuracy)[0])

    def checkpoint(self, step: int) -> None:
        self.procs.barrier()
        if self.procs.is_main:
            self.state["step"] = step
            self.state["consumed_prompts"] = step * self.config.prompts_per_step
            save_checkpoint(
                self.out, step, self.models.student, self.models.tokenizer, self.optimizer,
                self.scheduler, {k: v for k, v in self.state.items() if k != "step"},
                self.config.keep_checkpoints,
            )
        self.procs.barrier()

    # -- the loop -------------------------------------------------------------------------
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
        stopped_by = None
        metrics: dict[str, Any] = {}
        for step in bar:
            metrics = self.train_step(step)
            last = step == config.max_steps
            due = bool(config.eval_every) and step % config.eval_every == 0
            if self.eval_records and (due or last):
                with timed("eval", metrics):
                    metrics["accuracy"] = self.evaluate()
            stop = any(hook(metrics) for hook in self.hooks)
            if self.procs.is_main:
                append_jsonl(self.metrics_path, metrics)
                bar.set_postfix(_postfix(metrics), refresh=False)
            if stop:
                stopped_by = step
            if step % config.save_every == 0 or last or stop:
                self.checkpoint(step)
            if stop:
                break
        bar.close()
        summary = {
            "steps": metrics.get("step", self.state["step"]),
            "stopped_early_at": stopped_by,
            "initial_accuracy": self.state.get("initial_accuracy"),
            "final_accuracy": metrics.get("accuracy"),
            "skipped_steps": self.state["skipped_steps"],
            "final_checkpoint": str(complete_checkpoints(self.out)[-1])
            if complete_checkpoints(self.out) else None,
            "alerts": [asdict(a) for a in self.monitor.fired.values()],
        }
        if self.procs.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            write_run_report(self.out)
        return summary


def _postfix(metrics: dict[str, Any]) -> dict[str, str]:
    keys = {"loss": "loss", "overlap_ratio": "overlap", "entropy_gap": "H-gap",
            "train_reward": "reward", "accuracy": "acc"}
    return {short: f"{metrics[k]:.3g}" for k, short in keys.items()
            if isinstance(metrics.get(k), float)}


def run_training(config: TrainConfig, *, resume: bool = False,
                 hooks: Sequence[StepHook] = ()) -> dict[str, Any]:
    """Train per `config` (resuming from the last checkpoint if asked); returns the summary."""
    return Trainer(config, resume=resume, hooks=hooks).run()


def load_metrics(run_folder: str | Path) -> list[dict[str, Any]]:
    """The per-step records of a run folder."""
    return read_jsonl(Path(run_folder) / "metrics.jsonl")
