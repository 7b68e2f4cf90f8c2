"""The world's one tokenizer: a word-level Hugging Face fast tokenizer over a world's vocabulary.

Every model of the world shares this vocabulary (token-level OPD needs identical ids); only the
chat template differs between models, as a teacher carries the template it was post-trained with.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from opd.errors import OPDError
from opd.lab.world import ADDITION, TEMPLATES, World

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


def build_tokenizer(template: int = 1, world: World = ADDITION) -> PreTrainedTokenizerFast:
    """The word-level tokenizer of `world` (the zoo's by default) with prompt template
    `template` (1 or 2) as chat template.

    Words are split on whitespace and decoded joined by single spaces, so the world's texts
    (single-spaced words) round-trip exactly. No special token is added on encoding: the chat
    template writes the BOS itself.
    """
    if template not in TEMPLATES:
        raise OPDError(f"lab: unknown prompt template {template}; choose one of {sorted(TEMPLATES)}")
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *world.vocab))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        model_max_length=256,
    )
    tokenizer.chat_template = TEMPLATES[template]
    return tokenizer
