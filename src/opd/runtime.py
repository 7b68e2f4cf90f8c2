"""Run-time helpers of the loops: stage timers, step hooks and the process group.

One process needs no set-up. Several (`accelerate launch --num_processes N -m opd train …`)
share the step's prompts; `Processes` holds the few collective operations the loop needs and
is a no-op for a single process (gradients are synchronised by PyTorch: `opd.run.parallel`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist

Number = TypeVar("Number", int, float)


@contextlib.contextmanager
def timed(key: str, record: dict[str, Any]) -> Iterator[None]:
    """Add the block's wall time, in seconds, to `record[key]`."""
    start = time.perf_counter()
    yield
    record[key] = record.get(key, 0.0) + time.perf_counter() - start


class StepHook:
    """What a caller may add to the training loop: `on_step` sees each step's record after the
    live monitor (True asks the loop to checkpoint and stop); `on_end` gets the run's summary
    once summary.json is written (it may add to the summary the loop returns)."""

    def on_step(self, record: Mapping[str, Any]) -> bool:
        return False

    def on_end(self, summary: dict[str, Any]) -> None:
        return None


class Processes:
    """The process group as the loop sees it: rank, world size, device, sums and maxima."""

    def __init__(self) -> None:
        from accelerate import PartialState

        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.device = self.state.device
        self.is_main = self.state.is_main_process
        self.launched = dist.is_available() and dist.is_initialized()
        """Started by a distributed launcher (a process group exists, even of one process)."""
        if self.world > 1 and self.device.type == "cpu":
            # Processes sharing a few cores must not each spin up all of them.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor)
        return tensor

    def max(self, value: Number) -> Number:
        """The largest `value` (an int or a float) of any process."""
        if self.world == 1:
            return value
        dtype = torch.float64 if isinstance(value, float) else torch.int64
        tensor = torch.tensor([value], dtype=dtype, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return type(value)(tensor[0])

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def wrapped_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules of `model` that PyTorch wrapped for several processes (`opd.run.parallel`)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_wrapped(model: torch.nn.Module) -> bool:
    """Whether `opd.run.parallel.prepare` wrapped `model` for several processes."""
    return bool(wrapped_units(model))


def is_main_process() -> bool:
    """True in a single process and in the main process of a launch."""
    from accelerate import PartialState

    return PartialState().is_main_process


def is_installed(module: str) -> bool:
    """Whether `module` can be imported (looked up without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # e.g. a module set to None in sys.modules
        return False
