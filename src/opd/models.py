"""Load student and teacher through the ordinary Hugging Face path, and check that token-level
OPD is possible between them (one vocabulary, same ids)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.errors import OPDError

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
