"""A distributed launch: the student (and, if asked, the teacher) under PyTorch's own
data-parallel machinery, applied unit by unit so that the backbone and the output head can be called apart
(the chunked head of `opd.step.scoring` calls them separately, which a wrapped `forward` cannot).

- `parallel: fsdp` shards every unit with FSDP2 (`torch.distributed.fsdp.fully_shard`): each
  process holds 1/N of the parameters, gradients and AdamW moments; a unit's parameters are
  all-gathered just before it runs and its gradients reduce-scattered as soon as they are made.
- `parallel: ddp` applies FSDP2's replicated twin (`torch.distributed._composable.
  replicate_with_fsdp.replicate`, the successor of the composable `replicate`) to the same
  units: whole copies, gradients all-reduced unit by unit.

The units, innermost first: each decoder layer (the classes named by the model's
`_no_split_modules`), the output head (grouped with the input embedding when the two share one
weight, so the shared weight has one owner), the backbone, the root. The loop normalises each
process's loss by the global token count, so gradients are summed across processes, not
averaged (gradient divide factor 1). Every unit call is a collective, so the processes must call
each unit equally often: `score(..., chunks=…)` runs the same number of head chunks everywhere
(`whole_head` keeps the head gathered over them), and rollouts and evaluation run inside
`gathered` (whole parameters, no collective per call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opd.config.choices import CROSS_TOKENIZER
from opd.errors import OPDError
from opd.runtime import wrapped_units
from opd.step.scoring import hf_model

if TYPE_CHECKING:
    from opd.config.training import TrainConfig
    from opd.models.loading import TrainingModels


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers: modules whose class the model names in `_no_split_modules`."""
    inner = hf_model(model)
    names = set(getattr(inner, "_no_split_modules", None) or ())
    layers = [m for m in inner.modules() if type(m).__name__ in names]
    if not layers:
        raise OPDError(f"parallel: {type(inner).__name__} names no decoder layer class "
                       "(_no_split_modules), so it cannot be split into units; train it in one "
                       "process")
    return layers


def _units(model: nn.Module) -> list[nn.Module | list[nn.Module]]:
    """The units to wrap, innermost first; the root is the model itself."""
    inner = hf_model(model)
    head, embedding = inner.get_output_embeddings(), inner.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    head_unit: list[nn.Module] = [embedding, head] if tied else [head]
    return [*decoder_layers(model), head_unit, inner.base_model, model]


def checkpoint_layers(model: nn.Module) -> None:
    """Activation checkpointing: each decoder layer keeps only its inputs and is recomputed in
    backward (before `wrap`, which must see the checkpointed layers)."""
    from torch.distributed._composable import checkpoint

    for layer in decoder_layers(model):
        checkpoint(layer)


def wrap(model: nn.Module, mode: str, *, mixed_precision: str = "no",
         trainable: bool = True) -> nn.Module:
    """Apply `mode` (fsdp or ddp) to `model`'s units in place; gradients are summed across
    processes (`trainable`)."""
    try:
        from torch.distributed._composable.replicate_with_fsdp import replicate
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise OPDError(f"parallel: torch {torch.__version__} lacks FSDP2's fully_shard and "
                       "replicate; install torch 2.13 (tested) or train in one process") from None
    options: dict[str, Any] = {}
    if mixed_precision == "bf16":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                    reduce_dtype=torch.float32)
    if mode == "fsdp":
        apply = partial(fully_shard, reshard_after_forward=True, **options)
    else:
        apply = partial(replicate, **options)
    for unit in _units(model):
        apply(unit)
    if trainable:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # a sum (plain SUM: gloo has no
                module.set_force_sum_reduction_for_comms(True)  # pre-scaled sum)
    return model


@contextlib.contextmanager
def gathered(model: nn.Module | None) -> Iterator[None]:
    """Whole parameters on every process for the duration (one all-gather per unit), so that
    each process can call the model any number of times on its own: sampling stops when a
    process's own rollouts end, evaluation runs on the main process only. A model that is not
    sharded is left as it is. Enter it on every process."""
    from torch.distributed._composable.replicate_with_fsdp import ReplicateModule

    units = [u for u in (wrapped_units(model) if model is not None else [])
             if not isinstance(u, ReplicateModule)]  # replicated units are whole already
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


@contextlib.contextmanager
def whole_head(model: nn.Module | None) -> Iterator[None]:
    """For the chunks of one scoring pass: the output head's unit stays gathered and keeps its
    gradient to itself, so a chunk costs no collective; on exit the unit is sharded again and
    the backward that follows the pass (through the backbone) reduces the head's gradient once.
    A model that is not wrapped is left as it is."""
    from torch.distributed._composable.replicate_with_fsdp import ReplicateModule
    from torch.distributed.fsdp import FSDPModule

    head = hf_model(model).get_output_embeddings() if model is not None else None
    if not isinstance(head, FSDPModule):
        yield
        return
    sharded = not isinstance(head, ReplicateModule)

    def keep_whole(whole: bool) -> None:
        head.set_requires_gradient_sync(not whole, recurse=False)
        if sharded:
            head.set_reshard_after_forward(not whole, recurse=False)
            head.set_reshard_after_backward(not whole, recurse=False)

    keep_whole(True)
    try:
        yield
    finally:
        keep_whole(False)
        if sharded:
            head.reshard()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state (float tensors on the CPU) on the main process, empty elsewhere;
    a collective: call it on every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def grad_norm(total: torch.Tensor) -> float:
    """The global gradient norm `clip_grad_norm_` returned, as a number (a sharded norm is
    reduced across processes first)."""
    full = getattr(total, "full_tensor", None)
    return float(full() if full is not None else total)


def check_parallel_settings(config: TrainConfig, launched: bool) -> None:
    """Refuse what `prepare` cannot do outside a distributed launch (before any model loads)."""
    if not launched and config.mixed_precision != "no":
        raise OPDError("mixed_precision: bf16 needs a distributed launch (accelerate launch "
                       "--num_processes N, or torchrun, N ≥ 1); without one set dtype=bfloat16")
    if config.objective.name == CROSS_TOKENIZER and config.teacher_parallel == "fsdp":
        raise OPDError("teacher_parallel: a teacher with another tokenizer scores as many of its "
                       "own tokens as each process's text has, so its sharded head would run a "
                       "different number of times on each process; set teacher_parallel=replicate")


def prepare(models: TrainingModels, config: TrainConfig, launched: bool) -> None:
    """Wrap the run's models as `config` asks, in place: under a distributed launch the
    student per `parallel` (and the teacher per `teacher_parallel`), even a launch of one
    process (FSDP2 then gives mixed precision on one GPU); activation checkpointing in any
    case. Call it before the optimizer is made (wrapping replaces the parameters)."""
    if config.activation_checkpointing:
        checkpoint_layers(models.student)
    if not launched:
        return
    wrap(models.student, config.parallel, mixed_precision=config.mixed_precision)
    if models.teacher is not None and config.teacher_parallel == "fsdp":
        wrap(models.teacher, "fsdp", trainable=False)


@contextlib.contextmanager
def plain_class(model: nn.Module) -> Iterator[None]:
    """`model` as its own class for the duration (a wrapped one is of a generated subclass,
    whose name transformers would write into config.json)."""
    wrapped = type(model)
    index = getattr(wrapped, "_orig_cls_mro_index", None)
    if index is None:
        yield
        return
    model.__class__ = wrapped.__mro__[index]
    try:
        yield
    finally:
        model.__class__ = wrapped
