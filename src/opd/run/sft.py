"""Supervised fine-tuning of any Hugging Face causal LM on (prompt, response) pairs.

Used to build the model-organism world and for the off-policy cold start
(docs/method.md#recipes): the prompt
is rendered with `render_prompt` (the tokenizer's chat template when it has one), the EOS token is
appended to the response, and the cross-entropy loss covers the response tokens only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from opd.data.prompts import Messages, PromptRecord, render_prompt
from opd.errors import OPDError
from opd.run.optim import adamw_with_schedule
from opd.step.rollout import encode_prompts

IGNORE_INDEX = -100
Example = tuple[Messages | PromptRecord, str]


@dataclass(frozen=True)
class SFTConfig:
    """Settings of one supervised fine-tuning run."""

    steps: int = 500
    """Optimizer steps; the examples are reshuffled each time they have all been used."""
    batch_size: int = 64
    """Examples per step."""
    lr: float = 3e-3
    """Peak learning rate of AdamW."""
    warmup_steps: int = 20
    """Steps of linear warm-up from 0 to `lr`; a cosine decay to `min_lr_ratio * lr` follows."""
    min_lr_ratio: float = 0.05
    """Final learning rate as a share of `lr`."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Maximum global gradient norm (clipped before each step)."""
    max_length: int | None = None
    """Truncate prompt + response to this many tokens (None: keep everything)."""
    template: str | None = None
    """Prompt template with `{prompt}`, passed to `render_prompt` (None: the chat template)."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra variables for the chat template (e.g. `enable_thinking`), as in the OPD run."""
    seed: int = 0
    """Seed of the shuffling."""
    progress: bool = True
    """Show a tqdm progress bar with the running loss."""
    desc: str = "sft"
    """Label of the progress bar."""


def _encode(
    tokenizer: Any, example: Example, config: SFTConfig
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example: prompt tokens masked with IGNORE_INDEX."""
    prompt, response = example
    messages = prompt.messages if isinstance(prompt, PromptRecord) else prompt
    # Encoded exactly as rollouts encode their prompts, so SFT and OPD see the same tokens.
    (prompt_ids,) = encode_prompts(tokenizer, [render_prompt(messages, tokenizer, config.template,
                                                             config.chat_template_kwargs)])
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    response_ids = [*response_ids, tokenizer.eos_token_id]
    ids = [*prompt_ids, *response_ids]
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    if config.max_length is not None:
        ids, labels = ids[: config.max_length], labels[: config.max_length]
    return ids, labels


def collate(
    encoded: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad a batch of (ids, labels) into input_ids, attention_mask and labels tensors."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass(frozen=True)
class EarlyStopping:
    """When a fine-tuning with validation examples stops before its step cap."""

    every: int = 25
    """Optimizer steps between two measurements of the validation loss."""
    patience: int = 4
    """Measurements in a row without improvement after which the fine-tuning stops."""
    min_improvement: float = 0.01
    """Relative fall of the validation loss below its best so far that counts as improving
    (1%: smaller changes are within the noise of a mean over a small validation set)."""


@dataclass
class SFTRun:
    """What one fine-tuning did: both loss curves and the step whose weights were kept."""

    train_losses: list[float]
    """The training loss of every step run."""
    validation: list[tuple[int, float]] = field(default_factory=list)
    """(steps done, validation loss) at each measurement; empty without validation examples."""
    best_step: int | None = None
    """Steps done when the validation loss was lowest: the weights kept (None: the last)."""
    stopped_early: bool = False
    """Whether the validation loss stopped improving before the step cap."""

    @property
    def steps(self) -> int:
        return len(self.train_losses)

    @property
    def best_loss(self) -> float | None:
        return min((loss for _, loss in self.validation), default=None)


@torch.no_grad()
def validation_loss(model: Any, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int,
                    batch_size: int) -> float:
    """Mean cross-entropy per response token over `encoded` examples, in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start:start + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits[:, :-1]
        labels = batch["labels"][:, 1:].to(device)
        total += float(torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum"))
        tokens += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(tokens, 1)


def train_sft(
    model: Any, tokenizer: Any, examples: Sequence[Example], config: SFTConfig = SFTConfig()
) -> list[float]:
    """Fine-tune `model` in place on `examples` ((messages or PromptRecord, response) pairs)
    for `config.steps` steps; returns the loss of every step. The model is left in eval mode."""
    return fit_sft(model, tokenizer, examples, config).train_losses


def fit_sft(
    model: Any, tokenizer: Any, examples: Sequence[Example], config: SFTConfig = SFTConfig(),
    validation: Sequence[Example] = (), stopping: EarlyStopping = EarlyStopping(),
) -> SFTRun:
    """Fine-tune `model` in place on `examples`. With `validation` examples, their loss is
    measured every `stopping.every` steps and at the cap; training stops once it has not
    improved for `stopping.patience` measurements, and the weights of the best measurement are
    restored (`config.steps` is then a cap). The model is left in eval mode."""
    if not examples:
        raise OPDError("sft: no examples; give at least one (prompt, response) pair")
    if tokenizer.eos_token_id is None:
        raise OPDError("sft: the tokenizer has no EOS token; set tokenizer.eos_token first")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [_encode(tokenizer, example, config) for example in examples]
    held_out = [_encode(tokenizer, example, config) for example in validation]
    device = next(model.parameters()).device
    optimizer, scheduler = adamw_with_schedule(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps, total_steps=config.steps, schedule="cosine",
        min_ratio=config.min_lr_ratio,
    )
    rng = random.Random(config.seed)
    order: list[int] = []
    run = SFTRun([])
    best_state: dict[str, torch.Tensor] | None = None
    waited = 0
    model.train()
    bar = tqdm(range(config.steps), desc=config.desc, disable=not config.progress, leave=False)
    for step in bar:
        batch_idx = []
        while len(batch_idx) < min(config.batch_size, len(encoded)):
            if not order:
                order = list(range(len(encoded)))
                rng.shuffle(order)
            batch_idx.append(order.pop())
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in batch_idx], pad_id).items()}
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        run.train_losses.append(loss.item())
        bar.set_postfix(loss=f"{run.train_losses[-1]:.3f}")
        done = step + 1
        if not held_out or (done % stopping.every and done != config.steps):
            continue
        value = validation_loss(model, held_out, pad_id, config.batch_size)
        best = run.best_loss
        run.validation.append((done, value))
        if best is None or value < best:
            run.best_step = done
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        improved = best is None or value < best * (1 - stopping.min_improvement)
        waited = 0 if improved else waited + 1
        bar.set_postfix(loss=f"{run.train_losses[-1]:.3f}", val=f"{value:.3f}")
        if waited >= stopping.patience:
            run.stopped_early = done < config.steps
            break
    if best_state is not None and run.best_step != run.steps:
        model.load_state_dict(best_state)
    model.eval()
    return run
