"""Load student, teacher and reference through the ordinary Hugging Face path (LoRA through
peft), and check that token-level OPD is possible between them (one vocabulary, same ids)."""

from __future__ import annotations

import contextlib
import json
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import logging as hf_logging

from opd.config.choices import CROSS_TOKENIZER
from opd.errors import OPDError, one_line
from opd.io import is_url

if TYPE_CHECKING:
    from opd.config.training import TrainConfig

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[name]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own warnings silenced for the block: our one line says what is wrong."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


SAVE_HINT = "make the folder with model.save_pretrained(folder) and tokenizer.save_pretrained(folder)"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
"""Weights of a transformers folder, in the order transformers prefers them."""
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tiktoken.model")
"""Files that hold a tokenizer's vocabulary (one of them is needed)."""
JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "model.safetensors.index.json",
              "pytorch_model.bin.index.json", "adapter_config.json")
"""JSON files of a model folder, each checked before transformers reads it."""


def _describe_missing(role: str, path: str, err: Exception) -> OPDError:
    if Path(path).expanduser().exists():
        return OPDError(f"{role}: could not load {path!r}: {one_line(err)}")
    return OPDError(
        f"{role}: {path!r} is not a local model folder and could not be loaded as a hub id "
        f"(no network here?). Give the path of a folder made by save_pretrained. ({type(err).__name__})"
    )


def _looks_local(path: str) -> bool:
    """A path no hub id can be (hub ids are `name` or `owner/name`)."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path


def _local_folder(path: str, role: str) -> Path | None:
    """The local folder `path` names (None: not on disk, so a hub id); a file or an empty
    folder is refused."""
    if is_url(path):
        raise OPDError(f"{role}: {path!r} is the URL of a served teacher; give a model folder "
                       "here (only teachers may be served: --teacher URL)")
    folder = Path(path).expanduser()
    if not folder.exists():
        if _looks_local(path):
            raise OPDError(f"{role}: there is no folder {path!r}; give the path of a model folder "
                           "(made by save_pretrained) or a hub id")
        return None
    if not folder.is_dir():
        raise OPDError(f"{role}: {path!r} is a file, not a model folder; give the folder "
                       f"({SAVE_HINT})")
    if not any(folder.iterdir()):
        raise OPDError(f"{role}: {path!r} is an empty folder: there is no model in it; {SAVE_HINT}")
    return folder


def _read_json(file: Path, role: str) -> dict[str, Any] | None:
    """A JSON object from `file` (None when it does not exist); a damaged file is named."""
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OPDError(f"{role}: {file} is corrupt or cut short (not valid JSON: "
                       f"{one_line(err, 80)}); copy it again or {SAVE_HINT}") from None
    except OSError as err:
        raise OPDError(f"{role}: cannot read {file} ({err.strerror})") from None
    if not isinstance(data, dict):
        raise OPDError(f"{role}: {file} is corrupt (a JSON {type(data).__name__}, not an object); "
                       f"copy it again or {SAVE_HINT}")
    return data


def _remote_code(role: str, path: str, file: str, kind: str) -> OPDError:
    return OPDError(
        f"{role}: {path!r} asks to run its own Python code ({kind} {file} is not built into "
        "transformers, only named in its auto_map); opd runs a folder's code only when asked: "
        "pass --trust-remote-code if you trust it")


def _check_weights(folder: Path, role: str) -> None:
    """The weights transformers would read exist and are whole (safetensors headers parse and
    cover the file; a .bin is a complete zip archive)."""
    present = [name for name in WEIGHT_FILES if (folder / name).exists()]
    if not present:
        raise OPDError(f"{role}: no weights in {str(folder)!r} (model.safetensors or "
                       f"pytorch_model.bin is missing); {SAVE_HINT}")
    name = present[0]
    if name.endswith(".index.json"):
        index = _read_json(folder / name, role) or {}
        shards = sorted(set((index.get("weight_map") or {}).values()))
        if not shards:
            raise OPDError(f"{role}: {folder / name} lists no weight files; copy it again or "
                           f"{SAVE_HINT}")
        files = [folder / shard for shard in shards]
    else:
        files = [folder / name]
    for file in files:
        if not file.exists():
            raise OPDError(f"{role}: {file} is missing (listed in {name}); copy the whole folder "
                           f"again or {SAVE_HINT}")
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), "pt"):
                    pass
            except Exception as err:  # safetensors raises its own error types
                raise OPDError(f"{role}: {file} is corrupt or cut short ({one_line(err, 100)}); "
                               f"copy it again or {SAVE_HINT}") from None
        elif not zipfile.is_zipfile(file):
            raise OPDError(f"{role}: {file} is corrupt or cut short (not a complete torch "
                           f"archive); copy it again or {SAVE_HINT}")


def check_model_folder(path: str, role: str, *, model: bool = True, tokenizer: bool = True,
                       trust_remote_code: bool = False) -> None:
    """Look at a local model folder before transformers does, so that a missing, empty or
    damaged folder, or one that asks to run its own code, is named in one line. `model`: the
    config and weights are needed; `tokenizer`: the tokenizer files. A hub id is left to
    transformers."""
    folder = _local_folder(path, role)
    if folder is None:
        return
    files = {name: _read_json(folder / name, role) for name in JSON_FILES}
    config = files["config.json"]
    known = config is not None and config.get("model_type") in CONFIG_MAPPING
    if config is not None and not known and config.get("auto_map") and not trust_remote_code:
        raise _remote_code(role, path, "config.json", f"model_type {config.get('model_type')!r} of")
    if model:
        if config is None and files["adapter_config.json"] is None:
            raise OPDError(f"{role}: {folder / 'config.json'} is missing, so {path!r} is not a "
                           f"complete model folder; {SAVE_HINT}")
        if config is not None:
            model_type = config.get("model_type")
            if not known and not config.get("auto_map"):
                if model_type is None:
                    raise OPDError(f"{role}: {folder / 'config.json'} has no model_type, so it is "
                                   f"not a transformers model config; {SAVE_HINT}")
                raise OPDError(f"{role}: {folder / 'config.json'} names model_type "
                               f"{model_type!r}, which transformers {transformers.__version__} "
                               "does not know; upgrade transformers")
            _check_weights(folder, role)
        elif not any((folder / name).exists() for name in ADAPTER_FILES):
            raise OPDError(f"{role}: no adapter weights in {str(folder)!r} (adapter_model"
                           ".safetensors is missing); save the adapter with save_pretrained")
    if tokenizer:
        if not any((folder / name).exists() for name in TOKENIZER_FILES):
            raise OPDError(f"{role}: no tokenizer in {path!r} (tokenizer.json is missing); save "
                           "one there with tokenizer.save_pretrained(folder)")
        settings = files["tokenizer_config.json"] or {}
        kind = settings.get("tokenizer_class")
        if settings.get("auto_map") and not trust_remote_code and not (
                isinstance(kind, str) and hasattr(transformers, kind)):
            raise _remote_code(role, path, "tokenizer_config.json", f"tokenizer_class {kind!r} of")


def context_window(path: str) -> int | None:
    """Positions the model at `path` can attend to, from its config.json (None: not stated)."""
    folder = Path(path).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


def load_tokenizer(path: str, role: str, trust_remote_code: bool = False):
    """AutoTokenizer with a pad token (the EOS token when the tokenizer has none)."""
    if not path:
        raise OPDError(f"{role}: no model given; pass --{role} PATH")
    check_model_folder(path, role, model=False, trust_remote_code=trust_remote_code)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _describe_missing(role, path, err) from None
    except Exception as err:  # a tokenizer file transformers cannot use
        raise OPDError(f"{role}: could not load the tokenizer in {path!r}: {one_line(err)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _mismatch(path: str, err: Exception) -> str:
    """The first tensor whose shape differs between the weights and the config (transformers
    only says so in a report table), or the error itself."""
    try:
        with quiet_transformers():
            _, info = AutoModelForCausalLM.from_pretrained(
                path, ignore_mismatched_sizes=True, output_loading_info=True, dtype=torch.float32)
        key, stored, expected = sorted(info["mismatched_keys"])[0]
        return (f"{key} is {list(stored)} in the weights but {list(expected)} by config.json, and "
                f"{len(info['mismatched_keys']) - 1} more")
    except Exception:
        return one_line(err, 160)


def load_model(
    path: str,
    role: str,
    *,
    trainable: bool,
    device: torch.device | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """A causal LM on `device`; a frozen one (teacher, reference) is in eval mode with no grads.
    Weights that lack some of the model's tensors are refused (transformers would fill them
    with random values)."""
    device = device or default_device()
    if not path:
        raise OPDError(f"{role}: no model given; pass --{role} PATH")
    check_model_folder(path, role, tokenizer=False, trust_remote_code=trust_remote_code)
    try:
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code,
                output_loading_info=True,
            )
    except (OSError, ValueError) as err:
        raise _describe_missing(role, path, err) from None
    except Exception as err:  # e.g. weights whose shapes do not match config.json
        raise OPDError(f"{role}: the weights in {path!r} do not fit its config.json "
                       f"({_mismatch(path, err)}); copy the folder again or {SAVE_HINT}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise OPDError(f"{role}: the weights in {path!r} lack {len(missing)} of the model's "
                       f"tensors (e.g. {missing[0]}), so they are incomplete; copy them again or "
                       f"{SAVE_HINT}")
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


def vocabulary_difference(student_tokenizer, teacher_tokenizer) -> tuple[int, str | None,
                                                                          str | None] | None:
    """The first id at which two vocabularies map to different tokens, with both tokens (None
    where a side has no such id); None when they map every id alike."""
    student_vocab = {i: t for t, i in student_tokenizer.get_vocab().items()}
    teacher_vocab = {i: t for t, i in teacher_tokenizer.get_vocab().items()}
    for token_id in range(max(len(student_vocab), len(teacher_vocab))):
        left, right = student_vocab.get(token_id), teacher_vocab.get(token_id)
        if left != right:
            return token_id, left, right
    return None


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student: str, teacher: str,
                          across: str = "distil across tokenizers with objective "
                                        "cross_tokenizer_kl") -> None:
    """Token-level OPD scores the student's token ids with the teacher: the two vocabularies
    must map every id to the same token. Stop at the first id where they differ, saying how to
    work `across` tokenizers instead."""
    difference = vocabulary_difference(student_tokenizer, teacher_tokenizer)
    if difference is not None:
        token_id, left, right = difference
        raise OPDError(
            "tokenizer mismatch: token-level OPD needs the student and teacher to share one "
            f"vocabulary. Student {student!r} ({len(student_tokenizer.get_vocab())} tokens) and "
            f"teacher {teacher!r} ({len(teacher_tokenizer.get_vocab())} tokens) first differ at "
            f"id {token_id}: {left!r} vs {right!r}. Pick a teacher from the same tokenizer "
            f"family, or {across}."
        )


@dataclass
class TrainingModels:
    """The models of one training run: the trained student, the frozen teacher (None without
    distillation, when it is served or when there are several) and reference (None without a
    KL penalty), and their tokenizers."""

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
    # else: served, or several (`teachers`, loaded by opd.teachers.build)
    local_teacher = config.distill_weight and not config.teachers and not is_url(config.teacher)
    if local_teacher:
        teacher_tokenizer = load_tokenizer(config.teacher, "teacher", config.trust_remote_code)
        if config.objective.name != CROSS_TOKENIZER:
            check_same_vocabulary(tokenizer, teacher_tokenizer, config.student, config.teacher)
    common = dict(device=device, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    if config.lora_rank and student_path != config.student:
        base = load_model(config.student, "student", trainable=True, **common)
        with _peft_quietly():
            student = _peft().PeftModel.from_pretrained(base, student_path, is_trainable=True)
    else:
        student = load_model(student_path, "student", trainable=True, **common)
        if config.lora_rank:
            peft = _peft()
            lora = peft.LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank,
                                   target_modules="all-linear")
            with _peft_quietly():
                student = peft.get_peft_model(student, lora)
    student_dropout = disable_dropout(student) if config.disable_dropout else []
    if local_teacher:
        teacher = load_model(config.teacher, "teacher", trainable=False, **common)
    reference = (
        load_model(config.student, "reference", trainable=False, **common)
        if config.kl_penalty else None
    )
    return TrainingModels(student, teacher, reference, tokenizer, teacher_tokenizer,
                          student_dropout)


@contextlib.contextmanager
def _peft_quietly() -> Iterator[None]:
    """peft reads `is_gradient_checkpointing`, which transformers 5 deprecates with a
    FutureWarning on every LoRA run; nothing the user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                category=FutureWarning)
        yield


def _peft():
    try:
        import peft
    except ImportError as err:
        raise OPDError("lora_rank > 0 needs peft: pip install 'opd[peft]'") from err
    return peft
