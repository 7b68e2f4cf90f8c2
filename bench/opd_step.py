"""Wall time of `opd train` steps on random Llama shapes (no download needed).

Builds a random student and a larger random teacher with a 151,936-token vocabulary, saves
them as HF folders with a byte-level tokenizer of that size, and runs a few OPD steps,
printing the per-stage times from metrics.jsonl. Random models never emit EOS, so every
rollout runs to --max-new-tokens: an upper bound on the rollout time per token.

    python bench/opd_step.py --out /tmp/opd-step            # GPU sizes (bf16)
    python bench/opd_step.py --out /tmp/opd-step --small    # CPU-sized shapes
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

SHAPES = {  # name: (hidden, layers, heads, intermediate)
    "student": (1024, 16, 16, 4096),
    "teacher": (2048, 16, 16, 8192),
}
SMALL = {"student": (128, 2, 4, 256), "teacher": (192, 2, 4, 384)}


def make_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_model(folder: Path, shape, vocab: int, tokenizer, seed: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, inter = shape
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         intermediate_size=inter, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--max-staleness", type=int, default=0,
                        help="rollouts of the next S steps sampled while a step updates")
    args = parser.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    vocab = 2_000 if args.small else args.vocab
    tokenizer = make_tokenizer(vocab)
    shapes = SMALL if args.small else SHAPES
    sizes = {name: make_model(root / name, shape, vocab, tokenizer, seed)
             for seed, (name, shape) in enumerate(shapes.items())}
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(f"w{(i * 7 + j) % 500}"
                                                              for j in range(64))}) + "\n"
                               for i in range(64)))
    from opd.config.training import build_config
    from opd.metrics import read
    from opd.run.loop import run_training

    config = build_config({
        "student": str(root / "student"), "teacher": str(root / "teacher"),
        "prompts": str(prompts), "out": str(root / "run"), "max_steps": args.steps,
        "prompts_per_step": args.prompts_per_step,
        "samples_per_prompt": args.samples_per_prompt, "max_new_tokens": args.max_new_tokens,
        "lr": 1e-6, "save_every": 10_000, "progress": False, "micro_batch": 16,
        "max_staleness": args.max_staleness,
    })
    run_training(config)
    print(f"student {sizes['student'] / 1e6:.0f}M params, teacher {sizes['teacher'] / 1e6:.0f}M, "
          f"vocab {vocab}, {args.prompts_per_step}x{args.samples_per_prompt} rollouts of "
          f"{args.max_new_tokens} tokens, max_staleness {args.max_staleness}, device "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
    print(f"{'step':>4} {'stale':>5} {'tokens':>7} {'rollout s':>9} {'score s':>8} "
          f"{'update s':>8} {'tok/s':>8}")
    for r in read(root / "run"):
        tokens = r["response_length"] * args.prompts_per_step * args.samples_per_prompt
        total = r["time_rollout"] + r["time_score"] + r["time_update"]
        print(f"{r['step']:>4} {r['staleness']:>5} {tokens:>7.0f} {r['time_rollout']:>9.2f} "
              f"{r['time_score']:>8.2f} {r['time_update']:>8.2f} {tokens / total:>8.0f}")
    if torch.cuda.is_available():
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
