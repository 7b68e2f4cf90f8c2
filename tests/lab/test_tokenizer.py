"""The shared word-level tokenizer: round trip, no unknown words, save and load."""

from __future__ import annotations

import random

from transformers import AutoTokenizer

from opd.data.prompts import render_prompt
from opd.lab.tokenizer import build_tokenizer
from opd.lab.world import DIALECTS, sample_problems, solve


def test_world_texts_round_trip_without_unknown_words() -> None:
    rng = random.Random(0)
    for template in (1, 2):
        tokenizer = build_tokenizer(template)
        for problem in sample_problems(50, digits=(2, 3), skills=("carry", "chain"), seed=3):
            prompt = render_prompt(problem.record().messages, tokenizer)
            for text in (prompt, *(solve(problem, d, rng) for d in DIALECTS)):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                assert tokenizer.unk_token_id not in ids
                assert tokenizer.decode(ids) == " ".join(text.split())


def test_saved_tokenizer_loads_back_identical(tmp_path) -> None:
    tokenizer = build_tokenizer(2)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert build_tokenizer(1).get_vocab() == tokenizer.get_vocab()
