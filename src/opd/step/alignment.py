"""Aligning two tokenizations of one text: the positions a teacher with another vocabulary
can score (docs/method.md#across-tokenizers).

The student's response and the teacher's re-tokenization of the same text are cut into spans:
the shortest runs of student tokens and of teacher tokens that end at the same character. A
span of one token on each side whose strings the vocabulary map pairs is *exact*: there the two
next-token distributions can be compared token by token through the map. Every other span is
compared as a whole, by the log-probability each model gives its text.

Character offsets come from decoding prefixes of the ids (`char_ends`), not from a tokenizer's
offset mapping: the student's sampled ids need not be the canonical tokenization of its text,
and every tokenizer can decode. Pure functions on lists and tensors; no model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Span = tuple[int, int, int, int]
"""Student tokens [start, stop) and teacher tokens [start, stop) covering the same characters."""


def char_ends(decode: Callable[[Sequence[int]], str], ids: Sequence[int], text: str) -> list[int]:
    """The character of `text` at which each token ends: the length of the longest prefix of
    `text` that the ids up to it decode to. A token that adds no character yet (a special token
    skipped on decoding, a byte that completes a character only with the next one) ends where
    the one before it did; the ends never decrease."""
    ends, last = [], 0
    for stop in range(1, len(ids) + 1):
        last = max(last, _shared_prefix(decode(ids[:stop]), text))
        ends.append(last)
    return ends


def _shared_prefix(left: str, right: str) -> int:
    """The number of leading characters two strings share."""
    for index, (a, b) in enumerate(zip(left, right, strict=False)):
        if a != b:
            return index
    return min(len(left), len(right))


def align_spans(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> list[Span]:
    """The finest partition of both token sequences into spans that end at the same character.

    Each span takes at least one token from each side, then the side that ends earlier takes
    more until both end at the same character; so a token that adds no character joins the
    span after it. Tokens left on one side when the other has run out join the last span (or
    make the only span, with nothing on the other side, when that side has no token at all).
    """
    n, m = len(student_ends), len(teacher_ends)
    spans: list[Span] = []
    i = j = 0
    while i < n and j < m:
        start = (i, j)
        i, j = i + 1, j + 1
        while student_ends[i - 1] != teacher_ends[j - 1]:
            if student_ends[i - 1] < teacher_ends[j - 1] and i < n:
                i += 1
            elif student_ends[i - 1] > teacher_ends[j - 1] and j < m:
                j += 1
            else:  # one side has run out before reaching the other's end
                i, j = n, m
        spans.append((start[0], i, start[1], j))
    if i < n or j < m:
        if spans:
            first_student, _, first_teacher, _ = spans.pop()
            spans.append((first_student, n, first_teacher, m))
        else:
            spans.append((0, n, 0, m))
    return spans


def token_strings(tokenizer) -> list[str | None]:
    """The text each token id adds after another token (None for special tokens, tokens that add
    nothing or only part of a character): so that a word-level token `5`, written ` 5` in
    running text, pairs with a byte-level `Ġ5` or a SentencePiece `▁5`, and not with a `5`
    that glues onto the word before it."""
    special = set(tokenizer.all_special_ids)
    size = len(tokenizer)
    context = next(i for i in range(size) if i not in special
                   and tokenizer.decode([i], clean_up_tokenization_spaces=False).isalnum())
    lead = tokenizer.decode([context], clean_up_tokenization_spaces=False)
    texts = tokenizer.batch_decode([[context, i] for i in range(size)],
                                   clean_up_tokenization_spaces=False)
    strings: list[str | None] = []
    for token_id, text in enumerate(texts):
        added = text[len(lead):] if text.startswith(lead) else ""
        ok = token_id not in special and added and "\ufffd" not in added
        strings.append(added if ok else None)
    return strings


def vocabulary_map(student_tokenizer, teacher_tokenizer, student_size: int,
                   teacher_size: int) -> torch.Tensor:
    """For each row of the student's output head [student_size], the teacher id [< teacher_size]
    of the token that adds the same text, or −1. One to one: where several ids add one text, the
    one each tokenizer writes it with is paired (`_token_of`). The two EOS tokens are paired
    with each other, and other special tokens of the same name too.

    A pair is left out where one side writes a text that the other has a single unpaired
    token for starting with the pair's token: a teacher that writes `10` as `1 ##0` puts the
    mass of the student's `10` on its `1`, so its `1` is not the student's `1` (a word of its
    own), and comparing them would move the student's mass from `10` to `1`."""
    mapped = torch.full((student_size,), -1, dtype=torch.long)
    student_strings = token_strings(student_tokenizer)[:student_size]
    teacher_strings = token_strings(teacher_tokenizer)[:teacher_size]
    teacher_of: dict[str | tuple[str, str], int] = dict(_token_of(teacher_tokenizer,
                                                                  teacher_strings))
    for token in teacher_tokenizer.all_special_tokens:
        teacher_of.setdefault(("special", token), teacher_tokenizer.convert_tokens_to_ids(token))
    pairs = [(student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id)]
    pairs += [(student_tokenizer.convert_tokens_to_ids(token), teacher_of.get(("special", token)))
              for token in student_tokenizer.all_special_tokens]
    pairs += [(token_id, teacher_of.get(text))
              for text, token_id in _token_of(student_tokenizer, student_strings).items()]
    used: set[int] = set()
    for student_id, teacher_id in pairs:
        if (student_id is None or teacher_id is None or not 0 <= student_id < student_size
                or not 0 <= teacher_id < teacher_size or mapped[student_id] >= 0
                or teacher_id in used):
            continue
        mapped[student_id] = teacher_id
        used.add(teacher_id)
    _drop_extended(mapped, student_tokenizer, teacher_tokenizer, student_strings,
                   teacher_strings)
    return mapped


def _token_of(tokenizer, strings: Sequence[str | None]) -> dict[str, int]:
    """Each text's token id; where several ids add the same text (a byte-fallback `<0x31>`
    beside `1`), the one the tokenizer writes the text with, else the lowest."""
    ids: dict[str, list[int]] = {}
    for token_id, text in enumerate(strings):
        if text is not None:
            ids.setdefault(text, []).append(token_id)
    repeated = [text for text, found in ids.items() if len(found) > 1]
    written = tokenizer(repeated, add_special_tokens=False)["input_ids"] if repeated else []
    chosen = {text: found[0] for text, found in ids.items()}
    for text, encoded in zip(repeated, written, strict=True):
        if len(encoded) == 1 and encoded[0] in ids[text]:
            chosen[text] = encoded[0]
    return chosen


def _drop_extended(mapped: torch.Tensor, student_tokenizer, teacher_tokenizer,
                   student_strings: Sequence[str | None],
                   teacher_strings: Sequence[str | None]) -> None:
    """Unpair, in place, each text that the other side starts an unpaired text with: where one
    side has a single token for `w + c` and the other writes it `w`, `c`, the latter's `w`
    holds the mass of `w + c` and the former's does not. Repeated until nothing changes (an
    unpaired text may start more); a duplicate id of a paired text is not unpaired."""
    while True:
        paired = {student_strings[i] for i in (mapped >= 0).nonzero()[:, 0].tolist()
                  if i < len(student_strings)}
        starts: set[str] = set()
        for own, other, other_strings in ((student_strings, teacher_tokenizer, teacher_strings),
                                          (teacher_strings, student_tokenizer, student_strings)):
            loose = sorted({text for text in own if text and text not in paired})
            firsts = other(loose, add_special_tokens=False)["input_ids"] if loose else []
            for text, ids in zip(loose, firsts, strict=True):
                first = other_strings[ids[0]] if ids and ids[0] < len(other_strings) else None
                if first is not None and first in paired and first != text \
                        and text.startswith(first):
                    starts.add(first)
        extended = [i for i, text in enumerate(student_strings)
                    if text in starts and mapped[i] >= 0]
        if not extended:
            return
        mapped[extended] = -1


@dataclass(frozen=True)
class TokenAlignment:
    """Where each of the student's M response tokens (row-major, as `ResponseStates`) finds its
    teacher among the teacher's response tokens (row-major over its own re-tokenization)."""

    exact: torch.Tensor
    """[M] the teacher token that predicts the same token as the student's, −1 where the span
    is not exact."""
    student: torch.Tensor
    """[K] with `teacher` [K] and `weight` [K]: student token `student[k]` takes the share
    `weight[k]` of teacher token `teacher[k]`'s log-prob (each span's teacher log-prob split
    equally over its student tokens)."""
    teacher: torch.Tensor
    weight: torch.Tensor
    orphan: torch.Tensor
    """[M] True for student tokens of a span with no teacher token (text the teacher has
    nothing of, e.g. a response of special tokens only): they get no signal."""
    span_start: torch.Tensor
    """[M] at the first student token of a span that is not exact and has teacher tokens, the
    span's first teacher token (both predict the text after the same characters); −1
    elsewhere."""

    def span_logprobs(self, teacher_token_lp: torch.Tensor) -> torch.Tensor:
        """[M] each student token's share of its span's teacher log-prob, from the teacher's
        log-prob of each of its response tokens [teacher M]; −inf for orphans."""
        shares = torch.zeros(self.exact.shape[0], dtype=teacher_token_lp.dtype,
                             device=teacher_token_lp.device)
        shares.index_add_(0, self.student.to(shares.device),
                          self.weight.to(shares) * teacher_token_lp[self.teacher.to(shares.device)])
        return shares.masked_fill(self.orphan.to(shares.device), -torch.inf)

    @property
    def aligned_share(self) -> float:
        """The share of student tokens at an exact position."""
        return float((self.exact >= 0).float().mean()) if self.exact.numel() else 0.0


def align_tokens(student_rows: Sequence[Sequence[int]], teacher_rows: Sequence[Sequence[int]],
                 student_ends: Sequence[Sequence[int]], teacher_ends: Sequence[Sequence[int]],
                 vocab_map: torch.Tensor) -> TokenAlignment:
    """The `TokenAlignment` of a batch from each row's ids and `char_ends` on both sides; a
    one-to-one span is exact when `vocab_map` pairs its student id with its teacher id."""
    exact: list[int] = []
    student, teacher, weight, orphan, span_start = [], [], [], [], []
    student_offset = teacher_offset = 0
    for s_ids, t_ids, s_ends, t_ends in zip(student_rows, teacher_rows, student_ends,
                                            teacher_ends, strict=True):
        for s0, s1, t0, t1 in align_spans(s_ends, t_ends):
            if s1 == s0:  # teacher tokens only: nothing of the student's to score
                continue
            one_to_one = s1 - s0 == 1 and t1 - t0 == 1
            is_exact = one_to_one and int(vocab_map[s_ids[s0]]) == t_ids[t0]
            exact.append(teacher_offset + t0 if is_exact else -1)
            exact += [-1] * (s1 - s0 - 1)
            span_start.append(teacher_offset + t0 if not is_exact and t1 > t0 else -1)
            span_start += [-1] * (s1 - s0 - 1)
            orphan += [t1 == t0] * (s1 - s0)
            for i in range(s0, s1):
                for j in range(t0, t1):
                    student.append(student_offset + i)
                    teacher.append(teacher_offset + j)
                    weight.append(1.0 / (s1 - s0))
        student_offset += len(s_ids)
        teacher_offset += len(t_ids)
    return TokenAlignment(torch.tensor(exact, dtype=torch.long),
                          torch.tensor(student, dtype=torch.long),
                          torch.tensor(teacher, dtype=torch.long),
                          torch.tensor(weight, dtype=torch.float64),
                          torch.tensor(orphan, dtype=torch.bool),
                          torch.tensor(span_start, dtype=torch.long))
