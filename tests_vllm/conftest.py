"""Fixtures of the vLLM engine tests (`make test-vllm`, in the .venv-vllm environment): a tiny
student vLLM can run (2 Llama layers, hidden 128 in 2 heads of size 64, float32) and the one
engine of the session, started once (~30-50 s on a CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tests.conftest import make_model
from tests_real.conftest import smollm2, smollm2_gguf  # noqa: F401  (SmolLM2's fixtures)

from opd.config.fields import VLLMConfig
from opd.step.engines import VLLMEngine, vllm_engine

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on vLLM's CPU build

SETTINGS = {"vllm.memory_share": 0.2, "vllm.enforce_eager": True, "dtype": "float32"}
"""What every engine of these tests uses; a run with the same settings reuses the session's
engine instead of starting another."""
VLLM = VLLMConfig(memory_share=0.2, enforce_eager=True)
CONTEXT = 128
"""max_position_embeddings of the tiny models (tests/conftest.py), the engine's length limit."""


@pytest.fixture(scope="session")
def vllm_pair(tmp_path_factory) -> dict[str, Path]:
    """Student and teacher folders vLLM can load, and prompts with answers."""
    root = tmp_path_factory.mktemp("vllm")
    student = make_model(root / "student", seed=1, hidden=128, heads=2)
    teacher = make_model(root / "teacher", seed=2, hidden=128, heads=2)
    rows = [{"prompt": f"{a} + {b} =", "answer": str((a + b) % 20)}
            for a in range(5) for b in range(4)]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"student": student, "teacher": teacher, "prompts": prompts, "root": root}


@pytest.fixture
def engine(vllm_pair) -> VLLMEngine:
    """The process's engine on the student folder: started by the first test that asks, then
    reused (started again only after a test needed an engine on another model). Every test
    gives it its own weights."""
    return vllm_engine(str(vllm_pair["student"]), dtype=torch.float32, max_model_len=CONTEXT,
                       settings=VLLM)
