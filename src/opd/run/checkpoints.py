"""Atomic checkpoints of a run: the HF model folder plus optimizer, scheduler, RNG and run
state, and a copy of the run's settings.

A checkpoint is written into `step-N.tmp` and renamed to `step-N` once complete; its last file,
`manifest.json`, lists every file with its size. A checkpoint counts as complete only when its
manifest is there and every file it lists has that size, so a folder cut short by a kill, a
full disk or a damaged copy is never resumed from. What is written how: the model as
safetensors (an HF folder); the optimizer and scheduler state with `torch.save`
(`optimizer.pt`, `scheduler.pt`: pickles, read back with `torch.load(weights_only=True)`, whose
restricted unpickler builds only tensors and plain values); the RNG state, run state and
manifest as JSON; the settings as YAML.

A run of several processes (`opd.run.parallel`) saves the whole model gathered (an ordinary HF
folder) and its AdamW state sharded: `optimizer/`, one safetensors file per process written by
`torch.distributed.checkpoint` (each with the offsets of its shards in its header, so no
pickled metadata). That state loads on any number of processes; on the number that saved it
the run resumes exactly, on another it continues (sums in another order: not bit-equal).
"""

from __future__ import annotations

import contextlib
import json
import pickle
import random
import shutil
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from opd.errors import OPDError, one_line
from opd.io import atomic_folder, remove_folder
from opd.run.cards import CARD_FILE
from opd.run.folder import (
    IN_FLIGHT_FILE,
    MANIFEST_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    SCHEDULER_FILE,
    SETTINGS_FILE,
    SHARDED_OPTIMIZER,
    STATE_FILE,
    RunFolder,
)


def rng_state() -> dict[str, Any]:
    """Every global RNG's state as plain JSON data (lists of numbers)."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned: the same streams continue."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _write_manifest(folder: Path) -> None:
    files = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))


def _flat_optimizer_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    """The optimizer state's tensors keyed by parameter name (`state.<name>.exp_avg`, …); each
    process's share of a sharded one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    flat = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        flatten_optimizer_state_dict=True))
    return {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}


def start_checkpoint(out: Path, step: int) -> Path:
    """An empty `step-N.tmp` folder (main process) for the processes to write into."""
    tmp = RunFolder(out).checkpoint(step).with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _cause(err: BaseException) -> str:
    """What went wrong under `torch.distributed.checkpoint`, which gathers each process's
    exception into one `CheckpointException`."""
    failures = getattr(err, "failures", None)
    if failures:
        first = next(iter(failures.values()))
        err = first[0] if isinstance(first, tuple) else first
    return getattr(err, "strerror", None) or one_line(err, 80)


@contextlib.contextmanager
def _alone_quietly() -> Iterator[None]:
    """Without a process group `torch.distributed.checkpoint` reads and writes alone, and says
    so each time; that is intended here (a sharded state resumed by one process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded_optimizer(out: Path, step: int, model, optimizer) -> None:
    """Every process writes its share of the optimizer state into `step-N.tmp/optimizer`
    (a collective: call it on every process, after `start_checkpoint`)."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save
    from torch.distributed.checkpoint.api import CheckpointException

    folder = RunFolder(out).checkpoint(step).with_suffix(".tmp") / SHARDED_OPTIMIZER
    try:
        with _alone_quietly():
            save(_flat_optimizer_tensors(model, optimizer),
                 storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))
    except (OSError, CheckpointException) as err:  # DCP gathers each process's error in one
        raise OPDError(f"checkpoint: could not write step {step} to {folder} ({_cause(err)}): "
                       "free space, then run again with --resume") from None


def save_checkpoint(
    out: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict[str, Any], keep: int,
    settings: dict[str, Any] | None = None, card: str | None = None,
    model_state: dict[str, torch.Tensor] | None = None, in_flight: dict[int, Any] | None = None,
) -> Path:
    """Write everything (and the model card `card` as README.md) to `step-N.tmp`, the manifest
    last, then rename; keep the newest `keep` checkpoints. A write that fails (a full disk)
    leaves the previous checkpoints as they were and stops with one line.

    `optimizer` None: the processes already wrote the sharded optimizer state into the folder
    `start_checkpoint` made (`save_sharded_optimizer`); `model_state`: the gathered weights to
    save instead of the model's own; `in_flight`: the rollouts sampled ahead by older weights
    (plain values and tensors, read back by `load_in_flight`)."""
    final = RunFolder(out).checkpoint(step)
    tmp = final.with_suffix(".tmp")
    try:
        if optimizer is not None:
            start_checkpoint(out, step)
        with atomic_folder(final, begun=tmp):
            model.save_pretrained(tmp, state_dict=model_state)
            tokenizer.save_pretrained(tmp)
            if optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            (tmp / RNG_FILE).write_text(json.dumps(rng_state()))
            if settings is not None:
                (tmp / SETTINGS_FILE).write_text(yaml.safe_dump(settings))
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
            if in_flight:
                torch.save(in_flight, tmp / IN_FLIGHT_FILE)
            if card is not None:
                (tmp / CARD_FILE).write_text(card, encoding="utf-8")
            _write_manifest(tmp)
    except OSError as err:
        done = RunFolder(out).complete_checkpoints()
        last = f"the last complete one is {done[-1].name}" if done else "there is no complete one yet"
        raise OPDError(
            f"checkpoint: could not write step {step} to {tmp.parent} ({err.strerror or err}); "
            f"{last}: free space, then run again with --resume") from None
    for old in RunFolder(out).complete_checkpoints()[:-keep]:
        remove_folder(old)
    return final


def _load_tensors(file: Path, checkpoint: Path) -> Any:
    try:
        return torch.load(file, weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise OPDError(f"--resume: {file} is damaged ({one_line(err, 80)}); delete {checkpoint} "
                       "to resume from the checkpoint before it") from None


def _load_sharded_optimizer(checkpoint: Path, model, optimizer) -> None:
    """The optimizer state of `optimizer/` into this process's shares (any number of
    processes; a collective when there are several)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    state = get_optimizer_state_dict(model, optimizer, options=flat)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    try:
        with _alone_quietly():
            load(tensors, storage_reader=HuggingFaceStorageReader(
                str(checkpoint / SHARDED_OPTIMIZER)))
    except (Exception, CheckpointException) as err:  # DCP gathers each process's error
        raise OPDError(f"--resume: {checkpoint / SHARDED_OPTIMIZER} is damaged "
                       f"({_cause(err)}); delete {checkpoint} to resume from the "
                       "checkpoint before it") from None
    set_optimizer_state_dict(model, optimizer, {**state, **tensors}, options=flat)


def _shard_whole_optimizer(saved: dict[str, Any], model, optimizer) -> None:
    """A one-process optimizer state (keyed by parameter index) into the shares of a wrapped
    `model`'s optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [name for name, p in model.named_parameters() if p.requires_grad]
    whole = {"state": {names[i]: value for i, value in saved["state"].items()},
             "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                              for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, whole,
                             options=StateDictOptions(full_state_dict=True))


def load_in_flight(checkpoint: Path) -> dict[int, Any]:
    """The rollouts in flight saved with `checkpoint` (none for a synchronous run's)."""
    file = checkpoint / IN_FLIGHT_FILE
    return _load_tensors(file, checkpoint) if file.exists() else {}


def load_checkpoint(checkpoint: Path, optimizer, scheduler, model=None) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG state from `checkpoint`; returns the run state
    (the model itself is loaded from the folder like any HF model). `model`: the student the
    optimizer updates, which names its parameters; needed for a sharded optimizer state (it
    loads on any number of processes) and when `opd.run.parallel` wrapped the student (a
    one-process state is then split into the processes' shares). `optimizer.pt` and
    `scheduler.pt` are read with `weights_only=True`; the RNG and run state are JSON."""
    from torch.distributed.tensor import DTensor

    if (checkpoint / SHARDED_OPTIMIZER).is_dir():
        _load_sharded_optimizer(checkpoint, model, optimizer)
    else:
        saved = _load_tensors(checkpoint / OPTIMIZER_FILE, checkpoint)
        if model is None or not any(isinstance(p, DTensor) for p in model.parameters()):
            optimizer.load_state_dict(saved)
        else:
            _shard_whole_optimizer(saved, model, optimizer)
    scheduler.load_state_dict(_load_tensors(checkpoint / SCHEDULER_FILE, checkpoint))
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr  # what the schedule set last (a sharded state does not carry it)
    try:
        rng = json.loads((checkpoint / RNG_FILE).read_text())
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise OPDError(f"--resume: {checkpoint} is damaged ({one_line(err, 80)}); delete it to "
                       "resume from the checkpoint before it") from None
    set_rng_state(rng)
    return state
