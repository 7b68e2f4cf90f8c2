"""GGUF checkpoints in: a `.gguf` file, or a folder holding one, goes wherever opd takes a model.

It is dequantized once, through transformers' GGUF loader (the `gguf` extra), into an ordinary
Hugging Face folder (float32 weights, the tokenizer and chat template read from the file) kept
in a cache keyed by the file's sha256; every verb then reads that folder, and runs write
ordinary folders of their own. The run's `dtype` applies when the folder is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from opd.errors import OPDError, one_line
from opd.io import atomic_folder, is_url, write_text_atomic
from opd.models.loading import quiet_transformers

GGUF_EXTRA = 'pip install "opd[gguf]"'
SOURCE_FILE = "opd_gguf_source.json"
"""What a converted folder was made from (file name, sha256, transformers version)."""
MODEL_FIELDS = ("student", "teacher", "teacher2", "model", "teachers")
"""Settings of the verbs' configs that name a model (`teachers`: a mapping of them)."""


def cache_root() -> Path:
    """Where converted GGUF folders live: $OPD_CACHE/gguf (default ~/.cache/opd/gguf)."""
    return Path(os.environ.get("OPD_CACHE", "~/.cache/opd")).expanduser() / "gguf"


def gguf_file(path: str) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one `.gguf` file of a folder that is
    not a Hugging Face folder (no config.json); None when `path` names no GGUF file."""
    if not path or is_url(path):
        return None
    target = Path(path).expanduser()
    if target.is_file():
        return target if target.suffix == ".gguf" else None
    if not target.is_dir() or (target / "config.json").exists():
        return None
    found = sorted(target.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise OPDError(f"{path!r} holds several GGUF files ({names}); give the path of one of them")
    return found[0] if found else None


def file_digest(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        while block := stream.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def converted_folder(path: str, role: str) -> str:
    """`path` itself, unless it names a GGUF file: then the Hugging Face folder made from it
    (converted now if the cache does not hold it yet)."""
    file = gguf_file(path)
    if file is None:
        return path
    digest = file_digest(file)
    folder = cache_root() / digest[:16]
    if (folder / SOURCE_FILE).exists():
        return str(folder)
    print(f"{role}: converting {file.name} to a Hugging Face folder, once (cached in {folder})",
          file=sys.stderr)
    with atomic_folder(folder) as building:
        _convert(file, building, role)
        write_text_atomic(building / SOURCE_FILE, json.dumps(
            {"file": file.name, "sha256": digest, "transformers": transformers.__version__},
            indent=2) + "\n")
    return str(folder)


def with_converted_models(config: Any) -> Any:
    """`config` with each model setting that names a GGUF file replaced by its converted folder."""
    changes: dict[str, Any] = {}
    for name in MODEL_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, str) and value:
            folder = converted_folder(value, name)
            if folder != value:
                changes[name] = folder
        elif isinstance(value, Mapping):
            converted = {key: converted_folder(v, f"{name}.{key}") for key, v in value.items()}
            if converted != dict(value):
                changes[name] = converted
    return dataclasses.replace(config, **changes) if changes else config


def _convert(file: Path, out: Path, role: str) -> None:
    """Dequantize `file` into the Hugging Face folder `out` (float32)."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise OPDError(f"{role}: {file.name} is a GGUF file, which needs the gguf package: "
                       f"{GGUF_EXTRA}") from None
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
            loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                          dtype=torch.float32)
    except Exception as err:
        raise OPDError(f"{role}: transformers {transformers.__version__} cannot dequantize "
                       f"{file.name}: {one_line(err, 160)}") from None
    # A model loaded from GGUF refuses save_pretrained; the same weights in a model built from
    # its config without the quantization settings save as an ordinary folder.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_name_or_path", None)
    plain_config = AutoConfig.for_model(**settings)
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
