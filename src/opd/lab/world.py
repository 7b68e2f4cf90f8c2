"""The task family of the model-organism world: n-digit addition with a written-out chain of thought.

A problem is `a + b` with two `digits`-digit numbers. Its solution works column by column from the
right, writing each column's sum, the digit kept and the carry passed on, then ends with
`answer d d d d` (digits as separate words) so that `opd.evaluation.verify.exact_match` checks it against the
gold answer stored the same way.

Sub-skills are carry patterns, so that one model can be given a sub-skill another never saw:
- `nocarry`: no column carries;
- `carry`: some columns carry, but never two in a row (a column that receives a carry never
  passes one on);
- `chain`: a carry chain — a column that receives a carry also passes one on (the withheld skill).

Two dialects say the same reasoning differently (order of steps, words, separators). Each slot
that does not decide the answer draws from a few synonyms or an optional filler word, so that
next-token distributions are broad there, while the tokens that decide the answer (column sums,
digits, carries, the answer) stay deterministic.

A `World` is a set of `Dialect`s (data: the slots of a column) with its vocabulary. The zoo's is
`ADDITION` (dialects A and B), where nearly every position has one right token. `CHOICE` is the
same task with genuine choice (many synonyms drawn by Zipf's law, steps in a free order), so that
next-token distributions are spread as a pretrained model's are. Another world, with other words
and other orders of the same steps, is one value away (`World(name, dialects,
vocabulary(dialects))`), and `solve`, `sft_examples`, `max_new_tokens`,
`lab.tokenizer.build_tokenizer` and a zoo `Profile` take it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, replace

from opd.data.prompts import PromptRecord
from opd.errors import OPDError

SKILLS = ("nocarry", "carry", "chain")
FIELDS = ("top", "bottom", "carry_in", "total", "digit", "carry_out")
"""The numbers of a column a dialect can write (the `Column` fields)."""



@dataclass(frozen=True)
class Either:
    """Two independent steps that may be written in either order: `first` then `second` with
    probability `p_first`, else the other way round (the canonical wording keeps this order)."""

    first: tuple[Slot, ...]
    second: tuple[Slot, ...]
    p_first: float = 0.5


Slot = str | tuple[str, ...] | Either
"""One slot of a dialect's column: a `FIELDS` name (its number), a word, synonyms (one drawn),
or two runs of slots in a free order."""


def written_slots(slots: Iterable[Slot]) -> list[str | tuple[str, ...]]:
    """The slots a column writes one word for, with every `Either` opened in its own order."""
    out: list[str | tuple[str, ...]] = []
    for slot in slots:
        out += written_slots((*slot.first, *slot.second)) if isinstance(slot, Either) else [slot]
    return out


@dataclass(frozen=True)
class Dialect:
    """One way of writing the same column-by-column reasoning: the slots of a column, in order,
    with an optional filler word (drawn with probability `filler_p`) inserted before slot
    `filler_at` (`len(column)`: at the end). Synonyms (and fillers) are drawn with weight
    `(rank + 1) ** -preference`: 0 draws them uniformly, 1 prefers the first as Zipf's law
    does, so that a position's probability mass spreads over many words with a long tail."""

    name: str
    column: tuple[Slot, ...]
    filler: tuple[str, ...]
    filler_at: int = 0
    filler_p: float = 0.25
    preference: float = 0.0

    @property
    def words(self) -> tuple[str, ...]:
        """Every word the dialect can write besides numbers, in order of first appearance."""
        found = [w for slot in (*written_slots(self.column), self.filler)
                 for w in ((slot,) if isinstance(slot, str) else slot)
                 if not isinstance(slot, str) or slot not in FIELDS]
        return tuple(dict.fromkeys(found))

    def pick(self, options: tuple[str, ...], rng: random.Random | None) -> str:
        """One of `options`: the first without `rng` (canonical wording), else drawn by the
        dialect's preference."""
        if rng is None:
            return options[0]
        if not self.preference:
            return rng.choice(options)
        return rng.choices(options, [(i + 1) ** -self.preference for i in range(len(options))])[0]


def preferring_other_words(dialect: Dialect, name: str, shift: int = 1) -> Dialect:
    """`dialect` with the same words in the same steps, but other preferences: every list of
    synonyms (and the fillers) rotated by `shift`, and every free order's odds reversed. The
    reasoning is the same, the favourite words are not, as between two models of one family."""

    def rotated(slot: Slot) -> Slot:
        if isinstance(slot, Either):
            return Either(tuple(map(rotated, slot.first)), tuple(map(rotated, slot.second)),
                          1 - slot.p_first)
        if isinstance(slot, tuple):
            return slot[shift % len(slot):] + slot[:shift % len(slot)]
        return slot

    return replace(dialect, name=name, column=tuple(map(rotated, dialect.column)),
                   filler=rotated(dialect.filler))


TEMPLATE_WORDS = ("user", "assistant", ":", "question", "add", "and", "solution", ".")
NUMBERS = tuple(str(i) for i in range(20))  # a column sum is at most 9 + 9 + 1
ANSWER = "answer"


@dataclass(frozen=True)
class World:
    """The dialects of a world and its vocabulary: the numbers, the dialects' words, `answer`
    and the templates' words (`vocabulary` builds one in that order). Problems, templates and
    the tokenizer's construction are shared by every world; the tokens and the ways of
    reasoning are what differ."""

    name: str
    dialects: tuple[Dialect, ...]
    vocab: tuple[str, ...]

    def __post_init__(self) -> None:
        missing = [w for d in self.dialects for w in d.words if w not in self.vocab]
        if missing or set(NUMBERS + TEMPLATE_WORDS + (ANSWER,)) - set(self.vocab):
            raise OPDError(f"lab: world {self.name!r} lacks words in its vocab "
                           f"({missing[:3] or 'numbers, answer or template words'}); build it "
                           "with opd.lab.world.vocabulary")

    def dialect(self, name: str) -> Dialect:
        """The dialect called `name` (OPDError naming the choices when there is none)."""
        for dialect in self.dialects:
            if dialect.name == name:
                return dialect
        raise OPDError(f"lab: unknown dialect {name!r}; choose one of "
                       f"{tuple(d.name for d in self.dialects)}")

    def max_new_tokens(self, digits: int) -> int:
        """A generation budget that fits any solution of a `digits`-digit problem in any of
        the dialects (the longest column with its filler, then `answer` and up to `digits + 1`
        digits), with slack."""
        column = max(len(written_slots(d.column)) + 1 for d in self.dialects)
        return column * digits + digits + 10


def vocabulary(dialects: Iterable[Dialect]) -> tuple[str, ...]:
    """The vocabulary of a world with these dialects: numbers, the dialects' words, `answer`,
    the templates' words."""
    words = [w for d in dialects for w in d.words]
    return tuple(dict.fromkeys((*NUMBERS, *words, ANSWER, *TEMPLATE_WORDS)))


# Dialect A: `a + b + c = s , write d carry c' ;`  Dialect B: `col b a c c gives s -> digit d next c' |`
ADDITION = World(
    "addition",
    (
        Dialect("A", ("top", "+", "bottom", "+", "carry_in", "=", "total", ",",
                      ("write", "put", "note"), "digit", ("carry", "keep", "hold"), "carry_out",
                      ";"), filler=("now", "then", "ok"), filler_at=0),
        Dialect("B", ("col", "bottom", "top", "c", "carry_in", "gives", "total", "->",
                      ("digit", "emit", "out"), "digit", ("next", "pass", "fwd"), "carry_out",
                      "|"), filler=("hmm", "well", "right"), filler_at=12),
    ),
    # The vocabulary as the first zoo was built with (ids are part of every zoo model).
    vocab=(*NUMBERS, "+", "=", ",", ";", ANSWER, "write", "put", "note", "carry", "keep",
           "hold", "now", "then", "ok", "col", "c", "gives", "->", "|", "digit", "emit", "out",
           "next", "pass", "fwd", "hmm", "well", "right", *TEMPLATE_WORDS),
)
"""The zoo's world: 3-digit-style addition in dialects A and B."""
DIALECTS = tuple(d.name for d in ADDITION.dialects)
VOCAB = ADDITION.vocab

# The choice world: the same addition, but most word positions offer eight synonyms drawn by
# Zipf's law (the favourite about a third of the time, the top four about three quarters), the
# written digit and the carry come in a free order, and a filler is as likely as not. Dialect A2
# is A with other favourites (each list rotated, the free order's odds reversed); B reasons in
# other words and another order.
_CHOICE_A = Dialect(
    "A",
    ("top", ("+", "plus", "with", "adds", "joined", "more", "also", "&"), "bottom",
     ("+", "plus", "with", "adds", "joined", "more", "also", "&"), "carry_in",
     ("=", "is", "makes", "equals", "totals", "yields", "gets", "becomes"), "total",
     (",", "so", "thus", "hence", "giving", "therefore", "meaning", "then"),
     Either((("write", "put", "note", "set", "place", "record", "mark", "keep"), "digit"),
            (("carry", "hold", "move", "bring", "lift", "raise", "shift", "send"), "carry_out"),
            p_first=0.75),
     (";", "done", "!", "fin")),
    filler=("now", "ok", "alright", "right", "well", "good", "fine", "sure"), filler_at=0,
    filler_p=0.5, preference=1.0,
)
_CHOICE_B = Dialect(
    "B",
    ("col", "bottom", "top", "c", "carry_in",
     ("gives", "sums", "amounts", "comes", "reaches", "forms", "hits", "reads"), "total",
     ("->", "=>", ">>", "to", "into", "onto", "toward", "unto"),
     Either((("digit", "emit", "out", "low", "unit", "ones", "last", "rest"), "digit"),
            (("next", "pass", "fwd", "high", "over", "up", "onward", "ahead"), "carry_out"),
            p_first=0.75),
     ("|", "||", "/", "end")),
    filler=("hmm", "uh", "er", "um", "mm", "ah", "eh", "oh"), filler_at=10, filler_p=0.5,
    preference=1.0,
)
CHOICE = World("choice", dialects := (_CHOICE_A, preferring_other_words(_CHOICE_A, "A2"),
                                      _CHOICE_B), vocabulary(dialects))
"""A world with genuine choice: next-token mass spread like a pretrained model's, not on one
right token per step (the zoo's `choice` profile)."""

# Prompt templates, as Jinja chat templates stored in each model's tokenizer. The user message is
# the problem as written ("123 + 459"); the templates spell it out one character per word so that
# a word-level tokenizer sees single digits. Template 2 poses the same problem in other words.
_SPELL_USER = (
    "{% for ch in message['content'] %}{% if ch == '+' %}{{ plus }} "
    "{% elif ch != ' ' %}{{ ch }} {% endif %}{% endfor %}"
)
_TEMPLATE = (
    "{{ bos_token }} {% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ user_prefix }}" + _SPELL_USER + "{{ user_suffix }}"
    "{% elif message['role'] == 'assistant' %}{{ assistant_prefix }}"
    "{{ message['content'] }} {{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ assistant_prefix }}{% endif %}"
)
TEMPLATES: dict[int, str] = {
    1: "{% set user_prefix = 'user : ' %}{% set user_suffix = '' %}{% set plus = '+' %}"
    "{% set assistant_prefix = 'assistant : ' %}" + _TEMPLATE,
    2: "{% set user_prefix = 'question : add ' %}{% set user_suffix = '. ' %}"
    "{% set plus = 'and' %}{% set assistant_prefix = 'solution : ' %}" + _TEMPLATE,
}


@dataclass(frozen=True)
class Column:
    """One column of the written addition, right to left: digits, carry in, sum, digit, carry out."""

    top: int
    bottom: int
    carry_in: int
    total: int
    digit: int
    carry_out: int


@dataclass(frozen=True)
class Problem:
    """`a + b` with two `digits`-digit numbers."""

    a: int
    b: int
    digits: int

    @property
    def columns(self) -> list[Column]:
        """The columns from the units up, with the carries passed between them."""
        cols, carry = [], 0
        for i in range(self.digits):
            top, bottom = self.a // 10**i % 10, self.b // 10**i % 10
            total = top + bottom + carry
            cols.append(Column(top, bottom, carry, total, total % 10, total // 10))
            carry = total // 10
        return cols

    @property
    def chain(self) -> int:
        """Length of the longest run of consecutive carrying columns (0 = no carry)."""
        best = run = 0
        for col in self.columns:
            run = run + 1 if col.carry_out else 0
            best = max(best, run)
        return best

    @property
    def skill(self) -> str:
        """The sub-skill the problem needs: `nocarry`, `carry` or `chain`."""
        return SKILLS[min(self.chain, 2)]

    @property
    def answer(self) -> str:
        """The gold answer as digits separated by spaces, e.g. "1 0 1 3"."""
        return " ".join(str(self.a + self.b))

    @property
    def question(self) -> str:
        """The user message: the problem as written, e.g. "123 + 459"."""
        return f"{self.a} + {self.b}"

    def record(self) -> PromptRecord:
        """The problem as a prompt with its answer and meta (skill, digits, chain, operands)."""
        meta = {"skill": self.skill, "digits": self.digits, "chain": self.chain,
                "a": self.a, "b": self.b}
        return PromptRecord([{"role": "user", "content": self.question}], self.answer, meta)


def problem_from_record(record: PromptRecord) -> Problem:
    """Recover the problem from a prompt record written by `Problem.record`."""
    try:
        return Problem(int(record.meta["a"]), int(record.meta["b"]), int(record.meta["digits"]))
    except (KeyError, ValueError) as err:
        raise OPDError(
            "lab: the prompt record has no addition meta (a, b, digits); use records made by "
            "opd.lab.world"
        ) from err


def sample_problems(
    n: int,
    *,
    digits: Iterable[int],
    skills: Iterable[str],
    seed: int,
    exclude: Iterable[tuple[int, int]] = (),
) -> list[Problem]:
    """`n` distinct problems whose digit count is in `digits` and whose skill is in `skills`,
    drawn uniformly by rejection, skipping any `(a, b)` in `exclude` (held-out sets)."""
    digits, skills = tuple(digits), set(skills)
    if not digits or min(digits) < 1:
        raise OPDError(f"lab: digits must be positive integers, got {digits}")
    if not skills or not skills <= set(SKILLS):
        raise OPDError(f"lab: skills must be a non-empty subset of {SKILLS}, got {sorted(skills)}")
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[Problem] = []
    for _ in range(200 * n + 10_000):
        if len(out) == n:
            return out
        d = rng.choice(digits)
        a, b = rng.randrange(10 ** (d - 1), 10**d), rng.randrange(10 ** (d - 1), 10**d)
        problem = Problem(a, b, d)
        if (a, b) not in seen and problem.skill in skills:
            seen.add((a, b))
            out.append(problem)
    raise OPDError(
        f"lab: could not draw {n} distinct problems with digits {digits} and skills "
        f"{sorted(skills)}; ask for fewer or allow more digits"
    )


def solve(problem: Problem, dialect: str, rng: random.Random | None = None,
          world: World = ADDITION) -> str:
    """A correct chain-of-thought solution in `dialect` (a name in `world`).

    With `rng`, the non-deciding slots draw synonyms and optional fillers (training data);
    without it, the canonical wording (first synonym, no filler).
    """
    spec = world.dialect(dialect)

    def filler() -> list[str]:
        return [spec.pick(spec.filler, rng)] if rng and rng.random() < spec.filler_p else []

    def write(slots: Iterable[Slot], col: Column) -> list[str]:
        out: list[str] = []
        for slot in slots:
            if isinstance(slot, Either):
                parts = (slot.first, slot.second)
                if rng and rng.random() >= slot.p_first:
                    parts = parts[::-1]
                out += write((*parts[0], *parts[1]), col)
            elif isinstance(slot, tuple):
                out.append(spec.pick(slot, rng))
            else:
                out.append(str(getattr(col, slot)) if slot in FIELDS else slot)
        return out

    words: list[str] = []
    for col in problem.columns:
        for i, slot in enumerate(spec.column):
            if i == spec.filler_at:
                words += filler()
            words += write((slot,), col)
        if spec.filler_at == len(spec.column):
            words += filler()
    return " ".join([*words, ANSWER, problem.answer])


def sft_examples(
    records: Iterable[PromptRecord], dialect: str, seed: int, world: World = ADDITION
) -> list[tuple[PromptRecord, str]]:
    """(prompt, solution) pairs in `dialect`, with seeded synonyms and fillers, for `train_sft`."""
    rng = random.Random(seed)
    return [(record, solve(problem_from_record(record), dialect, rng, world))
            for record in records]


def max_new_tokens(digits: int, world: World = ADDITION) -> int:
    """A generation budget that fits any solution of a `digits`-digit problem in any dialect of
    `world` (for the zoo's: 14 words per column, then `answer` and the digits), with slack."""
    return world.max_new_tokens(digits)
