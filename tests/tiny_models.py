"""Tiny random causal LMs of many Hugging Face architectures, built from a config on the spot.

Each architecture gets its own config class and shape quirks (GPT-2's `n_embd` and `transformer`
backbone, OPT's learned positions with an offset and its `model.decoder`, Gemma2's final-logit
soft-capping and sliding layers, the mixture-of-experts routers, Phi-3's fused projections),
and every dropout-like field it has is set to `DROPOUT`, so that a model which is not really
switched to no-dropout shows it. Shapes are tiny (hidden 32, 2 layers) to keep a one-step run
under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DROPOUT = 0.1
"""What every dropout field of a matrix model is set to (GPT-2's and OPT's own default)."""


def _llama_like(tokenizer, **extra) -> dict[str, Any]:
    return {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "attention_dropout": DROPOUT, **extra}


def _special(tokenizer) -> dict[str, Any]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


ARCHITECTURES: dict[str, tuple[str, Any]] = {
    "llama": ("LlamaConfig", lambda tok: _llama_like(tok)),
    "qwen2": ("Qwen2Config", lambda tok: _llama_like(tok)),
    "qwen3": ("Qwen3Config", lambda tok: _llama_like(tok, head_dim=8)),
    "qwen3_moe": ("Qwen3MoeConfig", lambda tok: _llama_like(
        tok, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        decoder_sparse_step=1, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", lambda tok: _llama_like(
        tok, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=DROPOUT)),
    "mistral": ("MistralConfig", lambda tok: _llama_like(tok, sliding_window=4)),
    "gemma2": ("Gemma2Config", lambda tok: _llama_like(
        tok, head_dim=8, sliding_window=4, final_logit_softcapping=0.5,
        attn_logit_softcapping=5.0, query_pre_attn_scalar=8)),
    "phi3": ("Phi3Config", lambda tok: _llama_like(
        tok, resid_pdrop=DROPOUT, embd_pdrop=DROPOUT)),
    "gpt2": ("GPT2Config", lambda tok: {
        "vocab_size": len(tok), "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128,
        "resid_pdrop": DROPOUT, "embd_pdrop": DROPOUT, "attn_pdrop": DROPOUT}),
    "opt": ("OPTConfig", lambda tok: {
        "vocab_size": len(tok), "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 128, "word_embed_proj_dim": 32,
        "dropout": DROPOUT, "attention_dropout": DROPOUT, "layerdrop": DROPOUT}),
}
"""name → (transformers config class, tokenizer → config values)."""


def build_model(name: str, tokenizer, *, seed: int, tied: bool, dtype=torch.float32,
                **overrides):
    """A random `name`-shaped causal LM for `tokenizer` (not saved)."""
    import transformers

    config_class, values = ARCHITECTURES[name]
    settings = {**values(tokenizer), **_special(tokenizer), "tie_word_embeddings": tied,
                **overrides}
    config = getattr(transformers, config_class)(**settings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model


def save_model(folder: Path, name: str, tokenizer, *, seed: int, tied: bool, **overrides) -> Path:
    """`build_model` saved with its tokenizer in `folder`."""
    model = build_model(name, tokenizer, seed=seed, tied=tied, **overrides)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
