"""Rollout engines: opd's own sampler (`hf`) and a colocated vLLM engine (`vllm`).

`hf` is `opd.step.rollout`'s KV-cache sampler in transformers: exact and deterministic, the
reference. `vllm` samples the same rollouts through vLLM running in the training process (as
TRL's and verl's colocate modes do): the engine is started once per process (under a launcher,
one per process and device), and before it generates it is given the student's current weights
in memory (LoRA students: the adapters merged into copies of the base weights; the trained
model is not changed). Every request is one
rollout carrying its own seed, `rollout_seed(seed, prompt id, sample)`, so a rollout does not
depend on the other requests of its batch as far as vLLM's seeded sampling allows (docs in
README.md, "Rollouts on vLLM"). vLLM also returns the log-prob of every sampled token, which the
trainer compares with its own (`rollout_logprob_gap`).

vLLM is an optional extra (`pip install "opd[vllm]"`), imported only when the engine is asked
for; `require_engine` says so in one line before a run writes anything.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

from opd.config.choices import ENGINES
from opd.config.fields import VLLMConfig
from opd.errors import OPDError, one_line
from opd.runtime import is_installed
from opd.step.rollout import (
    Rollouts,
    assemble_rollouts,
    encode_prompts,
    generate_rollouts,
    pad_token_id,
    prompt_token_rows,
    rollout_seed,
    stop_token_ids,
)

VLLM_EXTRA = 'pip install "opd[vllm]"'


def require_engine(name: str, field: str = "rollout_engine") -> None:
    """Stop with one line naming the extra when the engine `name` needs a missing package."""
    if name not in ENGINES:
        raise OPDError(f"{field}: unknown engine {name!r}; choose one of {list(ENGINES)}")
    if name == "vllm" and not is_installed("vllm"):
        raise OPDError(f"{field}: vllm is not installed; {VLLM_EXTRA} (a CUDA machine), or "
                       f"set {field}=hf")


def checkpoint_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters of `model` whole and under its checkpoint names, for vLLM's loader (a tied
    weight under each of its names, as a checkpoint has it). For a peft LoRA model: each adapted
    layer's base weight plus its adapters' delta (a new tensor, so the trained model and its
    adapters stay as they are), under the base model's names. A wrapped student
    (`opd.run.parallel`) must be gathered (`parallel.gathered`): a replicated parameter is taken
    whole from this process."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    merged = {}
    if base is not model:
        from peft.tuners.lora import LoraLayer

        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
                merged[f"{name}.weight"] = weight
    for name, tensor in base.named_parameters(remove_duplicate=False):
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        tensor = merged.get(name, tensor).detach()
        whole = getattr(tensor, "full_tensor", None)  # a DTensor of a wrapped model
        yield name, whole() if whole is not None else tensor


class VLLMEngine:
    """A vLLM engine in this process that samples rollouts with the student's current weights.

    The engine core runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so weights move to it
    as tensors, not through disk or a socket, and scripts need no `__main__` guard. Under a
    launcher with several processes (torchrun, `accelerate launch`) each process runs its own
    engine on its own device through vLLM's `external_launcher` backend (tensor parallel size
    1), and samples its share of the step's prompts: data-parallel rollouts.
    """

    def __init__(self, model_path: str, *, dtype: torch.dtype, max_model_len: int,
                 settings: VLLMConfig, trust_remote_code: bool = False,
                 max_logprobs: int | None = None, field: str = "rollout_engine") -> None:
        require_engine("vllm", field)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        from vllm import LLM

        self.key = (model_path, dtype, settings, trust_remote_code)
        self.max_model_len = max_model_len
        self.sleeps = settings.sleep and torch.cuda.is_available()
        self.asleep = False
        several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        launcher = {"distributed_executor_backend": "external_launcher"} if several else {}
        try:
            self.llm = LLM(
                model=model_path, dtype=str(dtype).removeprefix("torch."),
                max_model_len=max_model_len, gpu_memory_utilization=settings.memory_share,
                enforce_eager=settings.enforce_eager, enable_sleep_mode=self.sleeps,
                trust_remote_code=trust_remote_code, seed=0, tensor_parallel_size=1, **launcher,
                **({} if max_logprobs is None else {"max_logprobs": max_logprobs}),
            )
        except (ValueError, RuntimeError, OSError) as err:
            raise OPDError(f"{field}: the vLLM engine could not start on {model_path!r} "
                           f"({one_line(err, 300)}); check the model folder, and that "
                           "vllm.memory_share is a share of memory that is free and holds the "
                           "model") from None

    def load_weights(self, model: torch.nn.Module) -> None:
        """Give the engine `model`'s current weights (in memory), and forget every cached
        prefix computed with the old ones."""
        self.wake()
        weights = list(checkpoint_weights(model))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def sample(self, prompt_rows: Sequence[list[int]], rows: Sequence[tuple[int, int]], *,
               max_new_tokens: int, temperature: float, top_p: float, seed: int,
               prompt_ids: Sequence[int], eos_ids: set[int]
               ) -> tuple[list[list[int]], list[list[float]]]:
        """One response per (prompt, sample) of `rows`, each a request with its own seed; the
        responses (EOS included) and the engine's log-prob of each of their tokens."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        params = [SamplingParams(
            n=1, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
            seed=rollout_seed(seed, prompt_ids[i], r), logprobs=0,
            stop_token_ids=sorted(eos_ids), ignore_eos=False, detokenize=False,
        ) for i, r in rows]
        requests = [TokensPrompt(prompt_token_ids=list(prompt_rows[i])) for i, _ in rows]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        responses, logprobs = [], []
        for output in outputs:
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            responses.append(tokens)
            logprobs.append([float(step[token].logprob)
                             for step, token in zip(completion.logprobs, tokens, strict=True)])
        return responses, logprobs

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sleep(self) -> None:
        """Free the engine's GPU memory until its next use (a no-op unless `sleep` is on and
        a GPU is in use)."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


_ENGINE: VLLMEngine | None = None
"""The process's engine: one per process, as GPU memory allows."""


def vllm_engine(model_path: str, *, dtype: torch.dtype, max_model_len: int, settings: VLLMConfig,
                trust_remote_code: bool = False) -> VLLMEngine:
    """The process's engine for `model_path`: started on first use, and reused while the model,
    dtype and settings are the same and its length limit suffices (any other request replaces
    it). Starting one takes a while, even for a tiny model on a CPU."""
    global _ENGINE
    key = (model_path, dtype, settings, trust_remote_code)
    if _ENGINE is not None and _ENGINE.key == key and _ENGINE.max_model_len >= max_model_len:
        return _ENGINE
    if _ENGINE is not None:
        _ENGINE.shutdown()
        _ENGINE = None
        gc.collect()
    _ENGINE = VLLMEngine(model_path, dtype=dtype, max_model_len=max_model_len, settings=settings,
                         trust_remote_code=trust_remote_code)
    return _ENGINE


def engine_for_prompts(model_path: str, tokenizer: Any, texts: Sequence[str], *,
                       max_new_tokens: int, dtype: torch.dtype, settings: VLLMConfig,
                       context_window: int | None, trust_remote_code: bool = False) -> VLLMEngine:
    """The process's engine for `model_path`, long enough for the longest of the rendered
    prompts `texts` plus `max_new_tokens` (within the model's context window)."""
    longest = max((len(ids) for ids in encode_prompts(tokenizer, texts)), default=0)
    return vllm_engine(model_path, dtype=dtype,
                       max_model_len=model_length_limit(context_window, longest, max_new_tokens),
                       settings=settings, trust_remote_code=trust_remote_code)


def model_length_limit(context_window: int | None, prompt_tokens: int, max_new_tokens: int) -> int:
    """The engine's max_model_len: the longest prompt plus the response cap, within the model's
    context window when it is known."""
    needed = prompt_tokens + max_new_tokens
    return needed if context_window is None else min(needed, context_window)


def sample_rollouts(engine: VLLMEngine, model: torch.nn.Module, tokenizer: Any,
                    prompts: Sequence[str] | Sequence[list[int]], *, n: int = 1,
                    max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                    seed: int = 0, prompt_ids: Sequence[int] | None = None,
                    max_prompt_tokens: int | None = None) -> Rollouts:
    """`generate_rollouts`' rollouts (same seeds, rows and padding) sampled by `engine` with
    `model`'s current weights; `Rollouts.sampled_logprobs` holds the engine's log-probs. The
    engine then sleeps (on a GPU, with `vllm.sleep`) until it is next given weights."""
    prompt_ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
    encoded = prompt_token_rows(tokenizer, prompts, max_prompt_tokens)
    eos_ids = stop_token_ids(model, tokenizer)
    longest = max((len(e) for e in encoded), default=0)
    if longest + max_new_tokens > engine.max_model_len:
        raise OPDError(f"rollout_engine: a prompt of {longest} tokens plus max_new_tokens "
                       f"({max_new_tokens}) exceeds the vLLM engine's length limit "
                       f"({engine.max_model_len}, from max_prompt_tokens); raise max_prompt_tokens")
    rows = [(i, r) for i in range(len(prompts)) for r in range(n)]
    engine.load_weights(model)
    responses, logprobs = engine.sample(
        encoded, rows, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        seed=seed, prompt_ids=prompt_ids, eos_ids=eos_ids)
    engine.sleep()
    return assemble_rollouts(tokenizer, encoded, [i for i, _ in rows], responses, eos_ids,
                             pad_token_id(tokenizer), sampled_logprobs=logprobs)


def sampled_token_logprobs(rollouts: Rollouts, rows: slice) -> torch.Tensor | None:
    """The engine's log-probs [M] of the response tokens of `rollouts[rows]`, in the trainer's
    row-major order (`ResponseStates`); None when opd's own sampler drew them."""
    return flat_logprobs(rollouts.sampled_logprobs, rows)


def flat_logprobs(per_rollout: list[list[float]] | None, rows: slice) -> torch.Tensor | None:
    """Per-rollout log-probs of the rollouts `rows` as one [M] tensor in the trainer's
    row-major token order (None for None)."""
    if per_rollout is None:
        return None
    return torch.tensor([lp for row in per_rollout[rows] for lp in row], dtype=torch.float32)


class ServedSampler(Protocol):
    """A model served elsewhere that samples rollouts itself, with the options of
    `generate_rollouts` (`opd.teachers.client.TeacherClient`)."""

    def rollouts(self, tokenizer: Any, prompts: Sequence[str] | Sequence[list[int]],
                 **options: Any) -> Rollouts: ...


def generate(engine: VLLMEngine | ServedSampler | None, model: torch.nn.Module | None,
             tokenizer: Any, prompts: Sequence[str] | Sequence[list[int]], **options: Any
             ) -> Rollouts:
    """Rollouts from `engine` (given `model`'s weights), from a served teacher (`engine` its
    client, `tokenizer` its own, no `model`), or from opd's own sampler when `engine` is None
    (same options as `generate_rollouts`; `batch_size` and `on_step` only apply to the sampler)."""
    if engine is None:
        return generate_rollouts(model, tokenizer, prompts, **options)
    options.pop("batch_size", None)
    options.pop("on_step", None)
    if isinstance(engine, VLLMEngine):
        return sample_rollouts(engine, model, tokenizer, prompts, **options)
    return engine.rollouts(tokenizer, prompts, **options)
