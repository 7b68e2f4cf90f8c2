"""The optimizer and learning-rate schedule shared by every loop (OPD/GRPO and SFT)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str,
                  min_ratio: float = 0.0) -> float:
    """Share of the peak learning rate at `step` (0-based): linear warm-up over
    `warmup_steps`, then constant, or a linear or cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        return 1.0
    return min_ratio + (1.0 - min_ratio) * decay


def adamw_with_schedule(
    params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float, warmup_steps: int,
    total_steps: int, schedule: str, min_ratio: float = 0.0,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its per-step scheduler (call `scheduler.step()` after each optimizer step)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(
        step, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule,
        min_ratio=min_ratio))
    return optimizer, scheduler
