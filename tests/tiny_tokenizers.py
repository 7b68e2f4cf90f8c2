"""Real tokenizers trained on the spot with `tokenizers`, with the chat templates users meet.

Two kinds of model (byte-level BPE as GPT-2, Llama-3 and Qwen use; Unigram as SentencePiece
models — Llama-2, Mistral, Gemma — use) and five styles over them:

- chatml (BPE, Qwen-like): no BOS; pad `<|endoftext|>`; ChatML with a system prompt and an
  `enable_thinking` switch; turns end with `<|im_end|>`, the EOS.
- llama3 (BPE): BOS `<|begin_of_text|>`, written by the template *and* added by the
  post-processor on `add_special_tokens=True`; a pad of its own; header blocks; `<|eot_id|>`.
- gpt2 (BPE): BOS = EOS = `<|endoftext|>`, no pad token, no template (plain text).
- gemma (Unigram): BOS `<bos>` written by the template; pad `<pad>`; the system prompt folded
  into the first user turn; turns end with `<end_of_turn>`, which is *not* the tokenizer's EOS
  (`<eos>`): only the model's generation config lists it. Final-logit soft-capping at 30.
- mistral (Unigram): BOS `<s>` written by the template, no pad token, left padding;
  `[INST] … [/INST]` with the system prompt prepended to the first user message; `</s>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CORPUS = [
    *(f"What is {a} plus {b}? The answer is {a + b}." for a in range(12) for b in range(12)),
    "You are a careful calculator. Think step by step, then give the answer.",
    "Reply with one number only.\nsystem user assistant model\n",
    "Let me think. First add the tens, then the units: so the sum is 21!",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,:;!?'\"()[]{}<>/+-=*_#|\n",
]

CHATML = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{%- for m in messages %}"
    "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
LLAMA3_WITH_DEFAULT_SYSTEM = LLAMA3.replace(
    "{{ bos_token }}",
    "{{ bos_token }}{%- if messages[0].role != 'system' %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nYou are a careful calculator.<|eot_id|>' }}"
    "{%- endif %}")
"""A teacher's own template over the same vocabulary: it adds a system prompt of its own."""
GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0].role == 'system' %}{%- set first = messages[0].content + '\\n\\n' %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set first = '' %}{%- set turns = messages %}"
    "{%- endif %}"
    "{%- for m in turns %}{%- set role = 'model' if m.role == 'assistant' else m.role %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + m.content"
    " + '<end_of_turn>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
)
MISTRAL = (
    "{{ bos_token }}"
    "{%- if messages[0].role == 'system' %}{%- set first = messages[0].content + '\\n\\n' %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set first = '' %}{%- set turns = messages %}"
    "{%- endif %}"
    "{%- for m in turns %}{%- if m.role == 'user' %}"
    "{{ '[INST] ' + (first if loop.first else '') + m.content + ' [/INST]' }}"
    "{%- else %}{{ m.content + eos_token }}{%- endif %}{%- endfor %}"
)


@dataclass(frozen=True)
class Style:
    """A tokenizer style: its kind, special tokens, chat template and the model it goes with."""

    kind: str  # "bpe" or "unigram"
    specials: tuple[str, ...]
    tokens: dict[str, str]  # bos_token / eos_token / pad_token / unk_token
    template: str | None
    arch: str
    turn_end: str  # the token that ends an assistant turn
    padding_side: str = "right"
    adds_bos: bool = False  # a post-processor adds BOS on `add_special_tokens=True`
    extra: dict[str, Any] = field(default_factory=dict)


STYLES = {
    "chatml": Style(
        "bpe", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, CHATML, "qwen3",
        "<|im_end|>"),
    "llama3": Style(
        "bpe", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"),
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
         "pad_token": "<|finetune_right_pad_id|>"}, LLAMA3, "llama", "<|eot_id|>",
        adds_bos=True),
    "gpt2": Style(
        "bpe", ("<|endoftext|>",),
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}, None, "gpt2", "<|endoftext|>"),
    "gemma": Style(
        "unigram", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
        GEMMA, "gemma2", "<end_of_turn>", extra={"final_logit_softcapping": 30.0}),
    "mistral": Style(
        "unigram", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, MISTRAL, "mistral",
        "</s>", padding_side="left"),
}


def build_tokenizer(name: str, template: str | None = None):
    """The style's tokenizer, trained on CORPUS (`template` replaces the style's own)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    style = STYLES[name]
    if style.kind == "bpe":
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=list(style.specials),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    else:
        core = Tokenizer(models.Unigram())
        core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        core.decoder = decoders.Metaspace(prepend_scheme="first")
        trainer = trainers.UnigramTrainer(vocab_size=160, special_tokens=list(style.specials),
                                          unk_token=style.tokens["unk_token"],
                                          show_progress=False)
    core.train_from_iterator(CORPUS, trainer)
    if style.adds_bos:
        bos = style.tokens["bos_token"]
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, core.token_to_id(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, chat_template=template or style.template,
        padding_side=style.padding_side, **style.tokens)


def save_style(folder: Path, name: str, *, seed: int, template: str | None = None) -> Path:
    """A tiny random model of the style's architecture with the style's tokenizer, saved; its
    generation config lists the turn end beside the tokenizer's EOS, as chat models do."""
    from tests.tiny_models import build_model

    style = STYLES[name]
    tokenizer = build_tokenizer(name, template)
    stops = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(style.turn_end)})
    model = build_model(style.arch, tokenizer, seed=seed, tied=False,
                        eos_token_id=stops[0] if len(stops) == 1 else stops, **style.extra)
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
