"""Rollout tokens per second: opd's own sampler (hf) against the vLLM engine, same model and batch.

Builds a random Llama (no download) saved as an HF folder with a word-level tokenizer, then
samples the same rollouts (one per prompt, temperature 1) three ways: opd's sampler; the vLLM
engine as the training loop uses it (`opd.step.engines.sample_rollouts`: weight sync from the
trainer's model, one seeded request per rollout with log-probs, `Rollouts` assembled); and a
plain `LLM.generate` of the same requests (no sync, no seeds, no log-probs), the ceiling. Needs
vLLM (`.venv-vllm` on a CPU, the `vllm` extra on a GPU). The engine's start is timed apart.

    python bench/rollout_engines.py                                    # CPU: tiny shape, float32
    python bench/rollout_engines.py --shape 0.5b --rollouts 256 --max-new-tokens 1024 \\
        --dtype bfloat16                                               # GPU (bench/gpu_check.sh)
    python bench/rollout_engines.py --model SmolLM2-135M-Instruct.Q4_1.gguf --rollouts 64 \\
        --max-new-tokens 64     # a real model (a folder or a GGUF file): its chat-rendered prompts
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from opd_step import make_model, make_tokenizer

SHAPES = {  # name: (hidden, layers, heads, intermediate); vLLM's CPU build wants head size 64
    "tiny": (128, 2, 2, 256),
    "0.5b": (896, 24, 14, 4864),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--model", default=None,
                        help="a real model instead of a random shape: a Hugging Face folder or a "
                        "GGUF file; its prompts are chat-rendered two-digit additions")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary size (default: 2,000 for tiny, 151,936 otherwise)")
    parser.add_argument("--rollouts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=3,
                        help="times each engine samples the batch; the fastest counts (a shared "
                        "machine's noise only slows a run down)")
    parser.add_argument("--memory-share", type=float, default=0.3,
                        help="vllm.memory_share (the share of RAM on vLLM's CPU build)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from opd.config.fields import VLLMConfig
    from opd.step.engines import sample_rollouts, vllm_engine
    from opd.step.rollout import generate_rollouts

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    from transformers import AutoModelForCausalLM

    if args.model:
        folder, tokenizer, prompts = real_model(args.model, args.rollouts)
        vocab, stop = tokenizer.vocab_size, tokenizer.eos_token_id
        args.prompt_tokens = max(len(p) for p in prompts)
    else:
        vocab, stop = args.vocab or (2_000 if args.shape == "tiny" else 151_936), 2
        folder = Path(tempfile.mkdtemp(prefix="opd-rollout-bench-"))
        tokenizer = make_tokenizer(vocab)
        make_model(folder, SHAPES[args.shape], vocab, tokenizer, seed=0)
        generator = torch.Generator().manual_seed(0)
        prompts = [[1, *torch.randint(4, vocab, (args.prompt_tokens - 1,),
                                      generator=generator).tolist()] for _ in range(args.rollouts)]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    options = dict(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)

    rows = []

    def timed(name: str, sample) -> None:
        best = None
        for _ in range(args.repeats):
            start = time.perf_counter()
            tokens = sample()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if best is None or tokens / seconds > best[0] / best[1]:
                best = (tokens, seconds)
        rows.append((name, *best))

    timed("hf (opd's sampler)",
          lambda: int(generate_rollouts(model, tokenizer, prompts, **options).response_lengths.sum()))
    start = time.perf_counter()
    engine = vllm_engine(str(folder), dtype=dtype,
                         max_model_len=args.prompt_tokens + args.max_new_tokens,
                         settings=VLLMConfig(memory_share=args.memory_share, sleep=False))
    started = time.perf_counter() - start
    sample_rollouts(engine, model, tokenizer, prompts[:2], **options)  # warm-up
    timed("vllm (opd engine: sync + seeded requests + log-probs)",
          lambda: int(sample_rollouts(engine, model, tokenizer, prompts, **options)
                      .response_lengths.sum()))
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    plain = SamplingParams(temperature=1.0, max_tokens=args.max_new_tokens, stop_token_ids=[stop])
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    timed("vllm (plain LLM.generate)", lambda: sum(
        len(o.outputs[0].token_ids) for o in engine.llm.generate(requests, plain, use_tqdm=False)))

    print(f"{args.model or 'shape ' + args.shape}, vocab {vocab}, {args.dtype} on {device.type}, "
          f"{args.rollouts} rollouts × ≤{args.max_new_tokens} tokens, prompts of "
          f"{args.prompt_tokens} tokens, best of {args.repeats}; vLLM engine start {started:.1f} s\n")
    print("| engine | tokens | seconds | tokens/s | × hf |")
    print("|---|---|---|---|---|")
    hf_rate = rows[0][1] / rows[0][2]
    for name, tokens, seconds in rows:
        rate = tokens / seconds
        print(f"| {name} | {tokens} | {seconds:.2f} | {rate:,.0f} | {rate / hf_rate:.2f} |")


def real_model(path: str, rollouts: int) -> tuple[Path, object, list[list[int]]]:
    """A real model's folder (converted from GGUF when it is one), tokenizer, and `rollouts`
    chat-rendered addition prompts as token ids."""
    import random

    from transformers import AutoTokenizer

    from opd.models.gguf import converted_folder

    folder = Path(converted_folder(path, "model"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rng, prompts = random.Random(0), []
    for _ in range(rollouts):
        question = f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}? Show your steps."
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return folder, tokenizer, prompts


if __name__ == "__main__":
    main()
