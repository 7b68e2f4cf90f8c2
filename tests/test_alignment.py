"""Aligning two tokenizations of one text (opd.step.alignment) against brute-force references:
random segmentations with hypothesis, and real tokenizers of two kinds (byte-level BPE and
Unigram) on the same texts."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.step.alignment import align_spans, align_tokens, char_ends, token_strings, vocabulary_map
from tests.conftest import make_digit_tokenizer, make_tokenizer
from tests.tiny_tokenizers import CORPUS, build_tokenizer


def brute_spans(student_ends: list[int], teacher_ends: list[int]) -> list[tuple[int, ...]]:
    """Tokens of positive length only: cut the text wherever both sides end a token, and take
    on each side the tokens that end within each piece."""
    cuts = sorted(set(student_ends) & set(teacher_ends))
    spans, previous = [], 0
    for cut in cuts:
        student = [i for i, e in enumerate(student_ends) if previous < e <= cut]
        teacher = [j for j, e in enumerate(teacher_ends) if previous < e <= cut]
        spans.append((student[0], student[-1] + 1, teacher[0], teacher[-1] + 1))
        previous = cut
    return spans


def covered(ends: list[int], start: int, stop: int) -> tuple[int, int]:
    """The characters [from, to) that tokens [start, stop) cover."""
    return (ends[start - 1] if start else 0), ends[stop - 1]


def assert_partition(spans, n: int, m: int) -> None:
    assert spans[0][0] == 0 and spans[0][2] == 0
    assert spans[-1][1] == n and spans[-1][3] == m
    for (_, s1, _, t1), (s0, _, t0, _) in itertools.pairwise(spans):
        assert (s1, t1) == (s0, t0)
    assert all(s1 > s0 and t1 > t0 for s0, s1, t0, t1 in spans)


@st.composite
def segmentations(draw, zero_length: bool = False):
    """Two cuttings of a text into tokens (as the characters they end at); with
    `zero_length`, some tokens add no character (a skipped special token, a partial byte)."""
    length = draw(st.integers(2, 40))
    sides = []
    for _ in range(2):
        cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=length)) | {length})
        if zero_length:
            repeats = draw(st.lists(st.integers(0, 3), min_size=len(cuts), max_size=len(cuts)))
            lead = draw(st.integers(0, 2))
            cuts = [0] * lead + [c for c, r in zip(cuts, repeats, strict=True)
                                 for _ in range(1 + r)]
        sides.append(cuts)
    return sides[0], sides[1]


@settings(max_examples=200, deadline=None)
@given(segmentations())
def test_spans_are_the_brute_force_finest_common_cuts(case):
    student, teacher = case
    spans = align_spans(student, teacher)
    assert spans == brute_spans(student, teacher)
    assert_partition(spans, len(student), len(teacher))
    for s0, s1, t0, t1 in spans:
        assert covered(student, s0, s1) == covered(teacher, t0, t1)
    # Where a student token and a teacher token cover the same characters, they are a span.
    pieces = {covered(teacher, j, j + 1): j for j in range(len(teacher))}
    for i in range(len(student)):
        j = pieces.get(covered(student, i, i + 1))
        if j is not None:
            assert (i, i + 1, j, j + 1) in spans


@settings(max_examples=200, deadline=None)
@given(segmentations(zero_length=True))
def test_tokens_that_add_no_character_join_a_span_of_the_same_text(case):
    student, teacher = case
    spans = align_spans(student, teacher)
    assert_partition(spans, len(student), len(teacher))
    for s0, s1, t0, t1 in spans:
        assert covered(student, s0, s1) == covered(teacher, t0, t1)


def test_a_side_without_tokens_makes_one_span_with_nothing_opposite():
    assert align_spans([0, 0], []) == [(0, 2, 0, 0)]
    assert align_spans([], [3]) == [(0, 0, 0, 1)]
    assert align_spans([], []) == []


REAL_TEXTS = [CORPUS[i] for i in (0, 17, 143)] + CORPUS[-4:]


def test_char_ends_never_decrease():
    # A prefix that decodes to less of the text (a partial character shown as U+FFFD).
    prefixes = ["ab", "a\ufffd", "abc"]
    assert char_ends(lambda ids: prefixes[len(ids) - 1], [1, 2, 3], "abc") == [2, 2, 3]


@pytest.fixture(scope="module")
def real_tokenizers():
    return build_tokenizer("gpt2"), build_tokenizer("gemma")


def decoder(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True,
                                        clean_up_tokenization_spaces=False)


def test_real_tokenizers_align_over_the_same_characters(real_tokenizers):
    bpe, unigram = real_tokenizers
    rng = random.Random(0)
    texts = REAL_TEXTS + [" ".join(rng.sample(CORPUS, 3)) for _ in range(5)]
    for text in texts:
        ends = []
        for tokenizer in (bpe, unigram):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            decode = decoder(tokenizer)
            assert decode(ids) == text
            side = char_ends(decode, ids, text)
            # Brute force: a token ends where the decoded prefix through it stops matching.
            for i in range(len(ids)):
                prefix = decode(ids[:i + 1])
                if text.startswith(prefix):
                    assert side[i] == len(prefix)
            assert side == sorted(side) and side[-1] == len(text)
            ends.append(side)
        spans = align_spans(*ends)
        assert_partition(spans, len(ends[0]), len(ends[1]))
        for s0, s1, t0, t1 in spans:
            assert covered(ends[0], s0, s1) == covered(ends[1], t0, t1)


def test_bytes_of_one_character_end_where_the_character_is_complete(real_tokenizers):
    bpe = real_tokenizers[0]
    text = "Déjà vu: 3 × 4 😀!"
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    ends = char_ends(decoder(bpe), ids, text)
    assert len(ids) > len(set(ends))  # some byte tokens add no character on their own
    assert ends == sorted(ends) and ends[-1] == len(text)
    complete = [len(decoder(bpe)(ids[:i + 1])) for i in range(len(ids))
                if text.startswith(decoder(bpe)(ids[:i + 1]))]
    assert sorted(set(ends)) == sorted(set(complete))


def test_the_vocabulary_map_pairs_tokens_that_add_the_same_text(real_tokenizers):
    bpe, unigram = real_tokenizers
    mapped = vocabulary_map(bpe, unigram, len(bpe), len(unigram))
    student_strings, teacher_strings = token_strings(bpe), token_strings(unigram)
    pairs = [(s, int(t)) for s, t in enumerate(mapped.tolist()) if t >= 0]
    assert len({t for _, t in pairs}) == len(pairs)  # one to one
    assert (bpe.eos_token_id, unigram.eos_token_id) in pairs
    words = [(s, t) for s, t in pairs if student_strings[s] is not None]
    assert len(words) > 10
    assert all(student_strings[s] == teacher_strings[t] for s, t in words)
    # Brute force: every shared text is paired (each appears once on each side here), unless
    # the other side writes a text only one side has as a token starting with it.
    for strings in (student_strings, teacher_strings):
        texts = [x for x in strings if x is not None]
        assert len(texts) == len(set(texts))
    kept = {x for x in student_strings if x} & {x for x in teacher_strings if x}
    while True:
        starts = set()
        for own, other, other_strings in ((student_strings, unigram, teacher_strings),
                                          (teacher_strings, bpe, student_strings)):
            for text in {x for x in own if x and x not in kept}:
                ids = other(text, add_special_tokens=False)["input_ids"]
                first = other_strings[ids[0]] if ids else None
                if first in kept and first != text and text.startswith(first):
                    starts.add(first)
        if not starts:
            break
        kept -= starts
    assert {student_strings[s] for s, _ in words} == kept
    assert len(kept) < len({x for x in student_strings if x} & {x for x in teacher_strings if x})


def test_identical_tokenizers_map_every_token_to_itself():
    tokenizer = make_tokenizer()
    size = len(tokenizer)
    assert vocabulary_map(tokenizer, tokenizer, size + 3, size).tolist() == [
        *range(size), -1, -1, -1]


def test_a_digit_tokenizer_shares_the_one_digit_numbers_and_words():
    words, digits = make_tokenizer(), make_digit_tokenizer()
    mapped = vocabulary_map(words, digits, len(words), len(digits))
    pairs = {words.convert_ids_to_tokens(s): digits.convert_ids_to_tokens(int(t))
             for s, t in enumerate(mapped.tolist()) if t >= 0}
    assert pairs["5"] == "5" and pairs["+"] == "+" and pairs["<eos>"] == "</s>"
    assert "12" not in pairs and "<bos>" not in pairs
    # The teacher's `1` also starts `10`…`19`, which it writes `1 ##0`…: not the student's `1`.
    assert "1" not in pairs


def test_token_alignment_marks_exact_spans_and_shares_the_others():
    words, digits = make_tokenizer(), make_digit_tokenizer()
    mapped = vocabulary_map(words, digits, len(words), len(digits))
    student = [words(t, add_special_tokens=False)["input_ids"] for t in ("12 + 5", "7")]
    student[1] = [*student[1], words.eos_token_id]
    teacher = [digits(t, add_special_tokens=False)["input_ids"] for t in ("12 + 5", "7")]
    teacher[1] = [*teacher[1], digits.eos_token_id]
    ends = [[char_ends(decoder(tok), ids, text) for ids, text in zip(rows, ("12 + 5", "7"),
                                                                      strict=True)]
            for tok, rows in ((words, student), (digits, teacher))]
    alignment = align_tokens(student, teacher, *ends, mapped)
    # Student "12" ↔ teacher "1 ##2" (a span), "+" ↔ "+", "5" ↔ "5"; then "7" ↔ "7", EOS ↔ EOS.
    assert alignment.exact.tolist() == [-1, 2, 3, 4, 5]
    assert alignment.aligned_share == pytest.approx(4 / 5)
    teacher_lp = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0], dtype=torch.float64)
    shares = alignment.span_logprobs(teacher_lp)
    assert shares.tolist() == [-3.0, -3.0, -4.0, -5.0, -6.0]
    # The other way round a span has several student tokens, which share its log-prob.
    reverse = align_tokens([teacher[0]], [student[0]], [ends[1][0]], [ends[0][0]],
                           vocabulary_map(digits, words, len(digits), len(words)))
    assert reverse.exact.tolist() == [-1, -1, 1, 2]
    assert reverse.span_logprobs(teacher_lp[:3]).tolist() == [-0.5, -0.5, -2.0, -3.0]
    orphan = align_tokens([[words.unk_token_id]], [[]], [[0]], [[]], mapped)
    assert orphan.span_logprobs(teacher_lp[:0]).tolist() == [-torch.inf]
