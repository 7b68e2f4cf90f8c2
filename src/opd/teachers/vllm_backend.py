"""The `vllm` backend of `opd serve-teacher`: a vLLM engine in the server's process scores
through `prompt_logprobs` and samples through its seeded generation (the `vllm` extra,
imported only when this backend is chosen).

What vLLM (0.32, its default model runner) gives at prompt positions, and so what this backend
answers: the log-prob of each response token and the teacher's top-k ids and log-probs, at
temperature 1 (vLLM's prompt log-probs are the raw model's). What it does not: the log-probs of
given token ids (`prompt_logprob_token_ids` needs vLLM's V2 model runner, which needs Triton),
and the whole distribution. So a request with candidates (the student-side top-k strategies) or
another temperature is refused with a 422 naming the hf backend, and the entropy sent is a
top-k estimate, −Σ over the top-k of q log q (a lower bound), marked `"entropy": "topk"`.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from opd.config.fields import VLLMConfig
from opd.models.loading import context_window, default_device, load_tokenizer, resolve_dtype
from opd.step.engines import VLLMEngine, model_length_limit
from opd.step.rollout import eos_token_ids
from opd.teachers.protocol import (
    BadRequest,
    GenerateRequest,
    Limits,
    ScoreRequest,
    encode_array,
    tokenizer_files,
    vocabulary_fingerprint,
)

NO_CANDIDATES = ("candidates: the vllm backend cannot score given token ids at prompt positions "
                 "(vLLM's prompt_logprob_token_ids needs its V2 model runner); the student-side "
                 "top-k strategies (student, union, symmetric-difference) need a teacher served "
                 "with --backend hf")
ONE_TEMPERATURE = ("temperature: the vllm backend scores at temperature 1 only (vLLM's prompt "
                   "log-probs are the raw model's); set teacher_temperature 1 or serve with "
                   "--backend hf")


def topk_entropy(top_logprobs: torch.Tensor) -> torch.Tensor:
    """−Σ q log q over each row's top-k log-probs [n, k]: the entropy's part on those tokens,
    a lower bound of the whole entropy (equal when the top-k hold all the mass)."""
    return -(top_logprobs.exp() * top_logprobs).sum(-1)


class VLLMBackend:
    """A vLLM teacher: exact token and top-k log-probs, a top-k entropy estimate, no
    candidates, temperature 1 only. vLLM batches the requests itself."""

    kind = "vllm"
    entropy = "topk"
    candidates = False
    temperatures = False

    def __init__(self, path: str, *, limits: Limits, dtype: str = "auto",
                 settings: VLLMConfig | None = None, trust_remote_code: bool = False) -> None:
        from transformers import GenerationConfig

        self.name = path
        self.tokenizer = load_tokenizer(path, "model", trust_remote_code)
        self.fingerprint = vocabulary_fingerprint(self.tokenizer)
        try:
            generation = GenerationConfig.from_pretrained(path)
        except OSError:  # the folder has no generation_config.json
            generation = None
        self.eos_ids = eos_token_ids(self.tokenizer, generation)
        self.files = tokenizer_files(self.tokenizer, generation)
        self.max_model_len = model_length_limit(context_window(path), limits.max_sequence_tokens,
                                                limits.max_new_tokens)
        self.engine = VLLMEngine(path, dtype=resolve_dtype(dtype, default_device()),
                                 max_model_len=self.max_model_len,
                                 settings=settings or VLLMConfig(), max_logprobs=limits.max_k,
                                 trust_remote_code=trust_remote_code, field="backend")
        self.vocab_size = int(self.engine.llm.llm_engine.model_config.get_vocab_size())
        self.lock = threading.Lock()

    def _check_length(self, rows: list[list[int]], name: str, extra: int = 0) -> None:
        for i, row in enumerate(rows):
            if len(row) + extra > self.max_model_len:
                more = f" plus max_new_tokens ({extra})" if extra else ""
                raise BadRequest(422, f"{name}[{i}]: {len(row)} tokens{more}, more than the vllm "
                                 f"engine's max_model_len ({self.max_model_len}, the model's "
                                 "context window); send shorter sequences")

    def score(self, request: ScoreRequest) -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if request.candidates is not None:
            raise BadRequest(422, NO_CANDIDATES)
        if request.temperature != 1.0:
            raise BadRequest(422, ONE_TEMPERATURE)
        self._check_length(request.sequences, "sequences")
        params = SamplingParams(max_tokens=1, prompt_logprobs=request.k, detokenize=False)
        with self.lock:
            outputs = self.engine.llm.generate(
                [TokensPrompt(prompt_token_ids=s) for s in request.sequences], params,
                use_tqdm=False)
        results = []
        for output, sequence, start in zip(outputs, request.sequences, request.response_starts,
                                           strict=True):
            # prompt_logprobs[t]: log p(sequence[t] | sequence[:t]) and the top-k there.
            steps = output.prompt_logprobs[start:]
            token = torch.tensor([step[t].logprob for step, t in zip(steps, sequence[start:],
                                                                     strict=True)])
            ids, top = [], []
            for step in steps:
                best = sorted(step.items(), key=lambda item: (-item[1].logprob, item[0]))
                chosen = sorted(best[: request.k])  # by id, as the hf backend sends them
                ids.append([i for i, _ in chosen])
                top.append([lp.logprob for _, lp in chosen])
            top_lp = torch.tensor(top, dtype=torch.float32)
            arrays = {"token_logprobs": token.float(), "topk_ids": torch.tensor(ids),
                      "topk_logprobs": top_lp, "entropy": topk_entropy(top_lp)}
            results.append({name: encode_array(value, request.encoding)
                            for name, value in arrays.items()} | {"candidate_logprobs": None})
        return {"results": results, "entropy": self.entropy, "encoding": request.encoding}

    def generate(self, request: GenerateRequest) -> dict[str, Any]:
        self._check_length(request.prompts, "prompts", request.max_new_tokens)
        rows = [(i, r) for i in range(len(request.prompts)) for r in range(request.n)]
        prompt_ids = request.prompt_ids or list(range(len(request.prompts)))
        with self.lock:
            responses, _ = self.engine.sample(
                request.prompts, rows, max_new_tokens=request.max_new_tokens,
                temperature=request.temperature, top_p=request.top_p, seed=request.seed,
                prompt_ids=prompt_ids, eos_ids=self.eos_ids)
        return {"responses": responses}
