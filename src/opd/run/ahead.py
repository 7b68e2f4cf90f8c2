"""Rollouts ahead of the update (`max_staleness` S > 0): a worker thread samples the next
steps' rollouts with its own copy of the student while the trainer scores and updates.

The schedule is fixed, not timed: step t's rollouts are sampled by the weights after update
max(0, t − 1 − S) (the policy version), so step t's staleness is min(t − 1, S) however fast
either side runs. With rollouts seeded per (step, prompt, sample) an asynchronous run is as
reproducible as a synchronous one, and it resumes exactly: a checkpoint keeps the batches that
weights older than its own sampled (`AheadBatch.saved`). The trainer hands the worker a copy of
its weights after each update (`push`); the worker loads a version just before the first step
that version samples, so at most S + 1 copies wait in its queue.

A thread rather than a process: torch releases the GIL in its kernels, the weights move as
tensors, and a failure comes back to the trainer as an exception at the step that needed the
batch, which stops the run with one line before anything of that step is written. On a GPU the
worker queues its kernels on a CUDA stream of its own, so they can run beside the trainer's
rather than after them; a copy of the weights is complete before the worker may read it.

`staleness_bias` is the meter's arithmetic: what a stale batch changed in the step's loss and
gradient against a fresh batch of the same prompts sampled by the current weights.
"""

from __future__ import annotations

import copy
import math
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from opd import metrics as M
from opd.errors import OPDError, one_line
from opd.step.rollout import Rollouts


@dataclass(frozen=True)
class AheadBatch:
    """One step's rollouts and the policy `version` (updates applied) of the weights that
    sampled them; `sampler_logprobs`: those weights' log-prob of each response token, per
    rollout (for `stale_loss: tis`), else None."""

    step: int
    version: int
    rollouts: Rollouts
    sampler_logprobs: list[list[float]] | None = None

    def saved(self) -> dict[str, Any]:
        """Plain values and tensors, for a checkpoint read back with weights_only."""
        rollouts = {f.name: getattr(self.rollouts, f.name) for f in fields(Rollouts)}
        return {"step": self.step, "version": self.version, "rollouts": rollouts,
                "sampler_logprobs": self.sampler_logprobs}

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> AheadBatch:
        return cls(saved["step"], saved["version"], Rollouts(**saved["rollouts"]),
                   saved["sampler_logprobs"])


Sampler = Callable[[torch.nn.Module, int], tuple[Rollouts, list[list[float]] | None]]
"""Step → its rollouts (and the sampler's log-probs) from the given copy of the student."""


class RolloutWorker:
    """A thread that samples the rollouts of steps ahead with its own copy of the student."""

    def __init__(self, student: torch.nn.Module, sample: Sampler, *, max_staleness: int,
                 max_steps: int) -> None:
        self.model = copy.deepcopy(student)
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.device = next(self.model.parameters()).device
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._settle()
        self.sample = sample
        self.max_staleness = max_staleness
        self.max_steps = max_steps
        self.jobs: queue.Queue[tuple[int, int, dict[str, torch.Tensor] | None] | None] = (
            queue.Queue())
        self.done: dict[int, AheadBatch] = {}
        self.failure: tuple[int, BaseException] | None = None
        self.ready = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._work, name="opd-rollouts", daemon=True)

    def start(self, first: int, saved: dict[int, AheadBatch]) -> None:
        """Queue steps first … first + S: those in `saved` (sampled by older weights, kept by
        the checkpoint resumed from) as they are, the others sampled by the weights the worker
        was made with (version first − 1). Only a checkpoint without a step's batch (the last
        one of a run whose max_steps was then raised) makes that step less stale than the
        schedule; its record says so."""
        for step in range(first, min(first + self.max_staleness, self.max_steps) + 1):
            if step in saved:
                self.done[step] = saved[step]
            else:
                self.jobs.put((step, first - 1, None))
        self.thread.start()

    def push(self, version: int, student: torch.nn.Module) -> None:
        """After update `version`: a copy of the weights it changed (the trainable ones: a
        LoRA student's adapters only) for the step they sample, if any."""
        step = version + 1 + self.max_staleness
        if step <= self.max_steps:
            weights = {name: param.detach().clone() for name, param in student.named_parameters()
                       if param.requires_grad}
            self._settle()
            self.jobs.put((step, version, weights))

    def take(self, step: int) -> AheadBatch:
        """Step `step`'s batch, once sampled (removed from the worker)."""
        batch = self._wait(step)
        with self.ready:
            del self.done[step]
        return batch

    def pending(self, after: int) -> dict[int, AheadBatch]:
        """The batches of steps after … after + S, which weights older than update `after`
        sample (waiting for them): what a checkpoint at `after` keeps."""
        last = min(after + self.max_staleness, self.max_steps)
        return {step: self._wait(step) for step in range(after + 1, last + 1)}

    def close(self) -> None:
        """Stop after the batch in progress; the queued ones are dropped."""
        self.stopping = True
        self.jobs.put(None)
        if self.thread.is_alive():
            self.thread.join()

    def _settle(self) -> None:
        """Wait for the trainer's queued GPU work (a copy of the weights) to finish."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).synchronize()

    def _wait(self, step: int) -> AheadBatch:
        with self.ready:
            while step not in self.done:
                if self.failure is not None:
                    failed, err = self.failure
                    raise OPDError(
                        f"max_staleness: the rollout worker failed sampling step {failed} "
                        f"({type(err).__name__}: {one_line(err, 200)}); the run stopped before "
                        f"step {step} was logged, its last checkpoint is kept: fix the cause "
                        "and run again with --resume")
                if not self.thread.is_alive():
                    raise OPDError(f"max_staleness: the rollout worker stopped before step "
                                   f"{step}; run again with --resume")
                self.ready.wait(timeout=1.0)
            return self.done[step]

    def _work(self) -> None:
        if self.stream is not None:
            torch.cuda.set_stream(self.stream)  # this thread's current stream
        while not self.stopping:
            job = self.jobs.get()
            if job is None or self.stopping:
                return
            step, version, weights = job
            try:
                if weights is not None:
                    unknown = self.model.load_state_dict(weights, strict=False).unexpected_keys
                    if unknown:  # a name the copy lacks: never silently skip a weight
                        raise RuntimeError(f"weights the worker's copy lacks: {unknown[:3]}")
                    if self.stream is not None:  # read before the trainer's stream reuses it
                        self.stream.synchronize()
                    weights = job = None
                rollouts, logprobs = self.sample(self.model, step)
            except BaseException as err:  # handed to the trainer, which stops the run
                with self.ready:
                    self.failure = (step, err)
                    self.ready.notify_all()
                return
            with self.ready:
                self.done[step] = AheadBatch(step, version, rollouts, logprobs)
                self.ready.notify_all()


def per_rollout(flat: torch.Tensor, response_mask: torch.Tensor) -> list[list[float]]:
    """A flat [M] per-token tensor in the trainer's row-major token order (`ResponseStates`)
    split into one list per rollout."""
    counts = response_mask[:, 1:].sum(-1).tolist()
    return [part.tolist() for part in flat.detach().float().cpu().split(counts)]


def staleness_bias(stale_loss: float, fresh_loss: float, stale_grads: Sequence[torch.Tensor],
                   fresh_grads: Sequence[torch.Tensor]) -> dict[str, float | None]:
    """What a stale batch changed against a fresh one of the same prompts: the loss's
    difference, and the gradient's cosine and norm ratio (stale / fresh); None where a zero
    gradient leaves them undefined."""
    dot = sum(float((s.double() * f.double()).sum()) for s, f in
              zip(stale_grads, fresh_grads, strict=True))
    stale = math.sqrt(sum(float(s.double().pow(2).sum()) for s in stale_grads))
    fresh = math.sqrt(sum(float(f.double().pow(2).sum()) for f in fresh_grads))
    both = stale * fresh
    return {M.STALENESS_LOSS_BIAS: stale_loss - fresh_loss,
            M.STALENESS_GRAD_COSINE: dot / both if both else None,
            M.STALENESS_GRAD_NORM_RATIO: stale / fresh if fresh else None}
