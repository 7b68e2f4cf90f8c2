"""Load student, teacher and reference through the ordinary Hugging Face path (LoRA through
peft), and check that token-level OPD is possible between them (one vocabulary, same ids)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from opd.errors import OPDError

if TYPE_CHECKING:
    from opd.config import TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _describe_missing(role: str, path: str, err: Exception) -> OPDError:
    if Path(path).expanduser().exists():
        return OPDError(f"{role}: could not load {path!r}: {err}")
    return OPDError(
        f"{role}: {path!r} is not a local model folder and could not be loaded as a hub id "
        f"(no network here?). Give the path of a folder made by save_pretrained. ({type(err).__name__})"
    )


def load_tokenizer(path: str, role: str, trust_remote_code: bool = False):
    """AutoTokenizer with a pad token (the EOS token when the tokenizer has none)."""
    if not path:
        raise OPDError(f"{role}: no model given; pass --{role} PATH")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _describe_missing(role, path, err) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str,
    role: str,
    *,
    trainable: bool,
    device: torch.device | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """A causal LM on `device`; a frozen one (teacher, reference) is in eval mode with no grads."""
    device = device or default_device()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise _describe_missing(role, path, err) from None
    model.to(device)
    if trainable:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    return model


_NOISE = re.compile(r"dropout|pdrop|layerdrop|jitter|(^|_)drop$")
"""Names of the train-time noise settings of Hugging Face models: dropout probabilities
(`dropout`, `attention_dropout`, GPT-2's `attn_pdrop`, …), OPT's `layerdrop`, the router
jitter of mixture-of-experts models (Mixtral's `router_jitter_noise`)."""

ConfigValue = tuple[Any, str, Any]
"""(config object, attribute, original value) of a setting `disable_dropout` zeroed."""


def _is_noise(name: str, value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool) and value != 0
            and _NOISE.search(name) is not None)


def _configs(model: torch.nn.Module) -> list[Any]:
    """Every model config reachable from `model`'s modules, with their sub-configs."""
    found: dict[int, Any] = {}
    pending = [m.config for m in model.modules()
               if isinstance(getattr(m, "config", None), PretrainedConfig)]
    while pending:
        config = pending.pop()
        if id(config) not in found:
            found[id(config)] = config
            pending += [v for v in vars(config).values() if isinstance(v, PretrainedConfig)]
    return list(found.values())


def disable_dropout(model: torch.nn.Module) -> list[ConfigValue]:
    """Switch off every dropout of `model` in place, so that in training mode it computes
    exactly what it computes in eval mode (the policy that sampled the rollouts).

    Hugging Face models hold dropout in three places, and all three are zeroed: `nn.Dropout`
    modules (GPT-2's `attn_dropout`, Phi-3's `resid_attn_dropout`, LoRA's dropout); numbers
    copied from the config at construction and applied functionally at forward time (OPT's
    `dropout` and `layerdrop`, Llama's `attention_dropout`, Mixtral's `jitter_noise`); and the
    config itself, which a few models read at forward time (GPT-Neo, Persimmon). Returns the
    config values it changed, which `original_config` puts back while a checkpoint is saved,
    so the saved model keeps its own settings.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_noise(name, value):
                setattr(module, name, type(value)(0))
    changed: list[ConfigValue] = []
    for config in _configs(model):
        for name, value in list(vars(config).items()):
            if _is_noise(name, value):
                changed.append((config, name, value))
                setattr(config, name, type(value)(0))
    return changed


@contextlib.contextmanager
def original_config(changed: list[ConfigValue]) -> Iterator[None]:
    """The config values `disable_dropout` zeroed, restored for the duration (to save a
    checkpoint); the modules keep dropout off."""
    for config, name, value in changed:
        setattr(config, name, value)
    try:
        yield
    finally:
        for config, name, value in changed:
            setattr(config, name, type(value)(0))


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student: str, teacher: str) -> None:
    """Token-level OPD scores the student's token ids with the teacher: the two vocabularies
    must map every id to the same token. Stop at the first id where they differ."""
    student_vocab = {i: t for t, i in student_tokenizer.get_vocab().items()}
    teacher_vocab = {i: t for t, i in teacher_tokenizer.get_vocab().items()}
    for token_id in range(max(len(student_vocab), len(teacher_vocab))):
        left, right = student_vocab.get(token_id), teacher_vocab.get(token_id)
        if left != right:
            raise OPDError(
                "tokenizer mismatch: token-level OPD needs the student and teacher to share one "
                f"vocabulary. Student {student!r} ({len(student_vocab)} tokens) and teacher "
                f"{teacher!r} ({len(teacher_vocab)} tokens) first differ at id {token_id}: "
                f"{left!r} vs {right!r}. Pick a teacher from the same tokenizer family."
            )


@dataclass
class TrainingModels:
    """The models of one training run: the trained student, the frozen teacher (None without
    distillation) and reference (None without a KL penalty), and their tokenizers."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    reference: torch.nn.Module | None
    tokenizer: Any
    teacher_tokenizer: Any
    student_dropout: list[ConfigValue] = field(default_factory=list)
    """The student's config values `disable_dropout` zeroed (restore them to save it)."""


def load_training_models(config: TrainConfig, device: torch.device,
                         student_path: str) -> TrainingModels:
    """Student from `student_path` (the configured one, or a checkpoint when resuming; LoRA
    adapters on top when `lora_rank` is set), with dropout off when `disable_dropout` is set;
    teacher and reference frozen, in eval mode."""
    tokenizer = load_tokenizer(config.student, "student", config.trust_remote_code)
    teacher = teacher_tokenizer = None
    if config.distill_weight:
        teacher_tokenizer = load_tokenizer(config.teacher, "teacher", config.trust_remote_code)
        check_same_vocabulary(tokenizer, teacher_tokenizer, config.student, config.teacher)
    common = dict(device=device, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    if config.lora_rank and student_path != config.student:
        base = load_model(config.student, "student", trainable=True, **common)
        student = _peft().PeftModel.from_pretrained(base, student_path, is_trainable=True)
    else:
        student = load_model(student_path, "student", trainable=True, **common)
        if config.lora_rank:
            peft = _peft()
            lora = peft.LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank,
                                   target_modules="all-linear")
            student = peft.get_peft_model(student, lora)
    student_dropout = disable_dropout(student) if config.disable_dropout else []
    if config.distill_weight:
        teacher = load_model(config.teacher, "teacher", trainable=False, **common)
    reference = (
        load_model(config.student, "reference", trainable=False, **common)
        if config.kl_penalty else None
    )
    return TrainingModels(student, teacher, reference, tokenizer, teacher_tokenizer,
                          student_dropout)


def _peft():
    try:
        import peft
    except ImportError as err:
        raise OPDError("lora_rank > 0 needs peft: pip install 'opd[peft]'") from err
    return peft
