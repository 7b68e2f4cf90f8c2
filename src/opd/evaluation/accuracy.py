"""avg@n accuracy of a model on a prompt set with reference answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from opd.config.fields import (
    Decoding,
    Generation,
    ModelLoading,
    OneModel,
    PromptSource,
    check_template,
)
from opd.config.settings import setting
from opd.data.prompts import PromptRecord, render_prompt, require_answers
from opd.evaluation.verify import VERIFIERS, get_verifier
from opd.step.engines import ServedSampler, VLLMEngine, generate, require_engine


@dataclass(frozen=True, kw_only=True)
class EvalConfig(Generation, Decoding, PromptSource, ModelLoading, OneModel):
    """Settings of `opd eval`."""

    model: str = setting("", "Model folder (or hub id) to evaluate.")
    prompts: str = setting("", "Prompt file, save_to_disk folder or hub dataset id with an "
                           "'answer' per row.")
    samples_per_prompt: int = setting(1, "Samples per prompt (avg@n).", minimum=1)
    temperature: float = setting(0.0, "Sampling temperature (0 = greedy).", minimum=0)
    verifier: str = setting("exact", "exact, number (the last number of the response, for "
                            "models that write no answer line) or math (needs math-verify).",
                            choices=tuple(VERIFIERS))
    template: str | None = setting(None, "Format string with {prompt} instead of the "
                                   "tokenizer's chat template.")
    chat_template_kwargs: dict[str, Any] = setting(
        factory=dict, help="Extra variables for the chat template, e.g. {enable_thinking: "
        "false}.")

    def check(self) -> None:
        check_template(self.template, "template")


@dataclass(frozen=True)
class EvalResult:
    """Mean over prompts of the share of its `n` samples that the verifier accepts."""

    accuracy: float
    per_prompt: list[float]
    n_prompts: int
    n: int
    mean_response_length: float
    truncation_rate: float


def evaluate(
    model: torch.nn.Module | None,
    tokenizer,
    records: Sequence[PromptRecord],
    *,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    verifier: str = "exact",
    template: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
    chat_template_kwargs: dict[str, Any] | None = None,
    engine: VLLMEngine | ServedSampler | None = None,
) -> EvalResult:
    """Sample `n` responses per prompt (greedy at temperature 0) and verify each one, with
    `engine` given `model`'s weights, or a served teacher's client (`model` None, `tokenizer`
    its own); opd's own sampler when it is None."""
    require_answers(records, "prompts", "evaluation")
    check = get_verifier(verifier)
    texts = [render_prompt(r.messages, tokenizer, template, chat_template_kwargs)
             for r in records]
    rollouts = generate(
        engine, model, tokenizer, texts, n=n, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
    )
    correct = [
        float(check(text, records[int(i)].answer))
        for text, i in zip(rollouts.texts, rollouts.prompt_index, strict=True)
    ]
    per_prompt = [sum(correct[j * n : (j + 1) * n]) / n for j in range(len(records))]
    return EvalResult(
        accuracy=sum(per_prompt) / max(len(per_prompt), 1),
        per_prompt=per_prompt,
        n_prompts=len(records),
        n=n,
        mean_response_length=float(rollouts.response_lengths.float().mean()),
        truncation_rate=float(rollouts.truncated.float().mean()),
    )


def evaluate_model(config: EvalConfig) -> EvalResult:
    """`opd eval`: load the model of `config` and measure its avg@n on the prompt set. Every
    input (verifier, prompts, model folder, each prompt's rendering and length) is checked
    before the model generates."""
    from opd.data.prompts import load_prompts, source_of
    from opd.models.loading import context_window, load_model, load_tokenizer, resolve_dtype
    from opd.step.engines import engine_for_prompts
    from opd.step.rollout import check_prompts

    get_verifier(config.verifier)
    require_engine(config.rollout_engine)
    records = load_prompts(config.prompts, **source_of(config))
    require_answers(records, "prompts", "evaluation")
    tokenizer = load_tokenizer(config.model, "model", config.trust_remote_code)
    model = load_model(config.model, "model", trainable=False, dtype=config.dtype,
                       trust_remote_code=config.trust_remote_code)
    check_prompts(records, tokenizer, config.template, who="the model's rendering",
                  limit=context_window(config.model), limit_name="the model's context window",
                  fix="shorten or remove the row",
                  chat_template_kwargs=config.chat_template_kwargs)
    engine = None
    if config.rollout_engine == "vllm":
        texts = [render_prompt(r.messages, tokenizer, config.template, config.chat_template_kwargs)
                 for r in records]
        engine = engine_for_prompts(
            config.model, tokenizer, texts, max_new_tokens=config.max_new_tokens,
            dtype=resolve_dtype(config.dtype, next(model.parameters()).device), settings=config.vllm,
            context_window=context_window(config.model), trust_remote_code=config.trust_remote_code)
    return evaluate(
        model, tokenizer, records, n=config.samples_per_prompt, temperature=config.temperature,
        top_p=config.top_p, max_new_tokens=config.max_new_tokens, verifier=config.verifier,
        template=config.template, seed=config.seed,
        chat_template_kwargs=config.chat_template_kwargs, engine=engine,
    )
