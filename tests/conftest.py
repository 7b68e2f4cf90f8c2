"""Shared fixtures: a tiny word-level tokenizer and tiny random Llama models saved as HF
folders, so the core tests exercise the real loading path without the model organisms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

TINY_WORDS = [str(i) for i in range(20)] + ["+", "=", "answer", "a", "b", "c", "d", "e"]


def make_tokenizer(words: list[str] = TINY_WORDS):
    """The tiny word-level tokenizer: four special tokens, then `words` in their order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
    )


def make_digit_tokenizer():
    """Another tokenizer of the tiny tokenizer's texts: numbers are cut into digits (WordPiece,
    `12` → `1 ##2`), so a teacher with it shares the one-digit numbers and the words with the
    student's vocabulary, under other ids, and not the two-digit numbers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for w in TINY_WORDS if not w.isdigit()]
    digits = [str(d) for d in range(10)] + [f"##{d}" for d in range(10)]
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", *digits, *words])}
    core = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="##"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )


def make_model(folder: Path, seed: int, hidden: int = 32, layers: int = 2, heads: int = 4,
               tokenizer=None):
    """A random tiny LlamaForCausalLM saved with its tokenizer (the tiny word-level one by
    default) in `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> dict[str, Path]:
    """Student and teacher folders (different random inits) and prompt files."""
    root = tmp_path_factory.mktemp("tiny")
    student = make_model(root / "student", seed=1)
    teacher = make_model(root / "teacher", seed=2, hidden=48)
    rows = [{"prompt": f"{a} + {b} =", "answer": str((a + b) % 20)}
            for a in range(5) for b in range(4)]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"student": student, "teacher": teacher, "prompts": prompts, "root": root}


@pytest.fixture(scope="session")
def digit_teacher(tmp_path_factory) -> Path:
    """A teacher folder for the tiny pair's student with another tokenizer
    (`make_digit_tokenizer`)."""
    return make_model(tmp_path_factory.mktemp("digits") / "teacher", seed=3, hidden=48,
                      tokenizer=make_digit_tokenizer())


@pytest.fixture(scope="session")
def sum_prompts(tmp_path_factory) -> Path:
    """A prompt file of 20 sums in the tiny tokenizer's words, without answers."""
    path = tmp_path_factory.mktemp("sums") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a} + {b} ="}) + "\n"
                            for a in range(5) for b in range(4)))
    return path


@pytest.fixture(autouse=True, scope="session")
def _close_tracker_runs_left_open():
    """A trackio run left open by a test would be finished at interpreter exit, printing after
    pytest's summary line; finish it with the session instead."""
    yield
    import sys

    trackio = sys.modules.get("trackio")
    if trackio is not None and trackio.context_vars.current_run.get() is not None:
        trackio.finish()


@pytest.fixture
def saved_figures(monkeypatch) -> dict[str, Any]:
    """The matplotlib figures saved during the test, by the name of the file each went to (as
    drawn: a test reads their lines, bars and images instead of only the PNG's existence)."""
    from matplotlib.figure import Figure

    figures: dict[str, Any] = {}
    savefig = Figure.savefig

    def record(figure, fname, *args, **kwargs):
        name = Path(fname).name
        if name.startswith(".") and ".tmp" in name:  # opd.io.write_atomic's name beside the file
            name = name[1:].rsplit(".tmp", 1)[0]
        figures[name] = figure
        return savefig(figure, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures
