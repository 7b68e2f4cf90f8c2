"""Atomic checkpoints of a run: the HF model folder plus optimizer, scheduler, RNG and run
state. A checkpoint folder exists under its final name only once it is complete."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opd.cards import CARD_FILE

STATE_FILE = "trainer_state.json"


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` folder left by a kill is ignored)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.suffix != ".tmp" and (p / STATE_FILE).exists()]
    return sorted(found)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict[str, Any], keep: int,
    card: str | None = None,
) -> Path:
    """Write everything (and the model card `card` as README.md) to `step-N.tmp`, then rename;
    keep the newest `keep` checkpoints."""
    final = checkpoint_dir(out, step)
    tmp = final.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
    if card is not None:
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in complete_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(checkpoint: Path) -> int:
    """The step a complete checkpoint was taken at."""
    return json.loads((checkpoint / STATE_FILE).read_text())["step"]


def load_checkpoint(checkpoint: Path, optimizer, scheduler) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG state from `checkpoint`; returns the run state
    (the model itself is loaded from the folder like any HF model)."""
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt"))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt"))
    set_rng_state(torch.load(checkpoint / "rng.pt", weights_only=False))
    return json.loads((checkpoint / STATE_FILE).read_text())
