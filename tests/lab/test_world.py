"""The task family: skills, both dialects' solutions verified, prompt templates."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from opd.data.prompts import render_prompt
from opd.errors import OPDError
from opd.evaluation.verify import exact_match
from opd.lab.tokenizer import build_tokenizer
from opd.lab.world import (
    CHOICE,
    DIALECTS,
    SKILLS,
    Dialect,
    Problem,
    World,
    max_new_tokens,
    problem_from_record,
    sample_problems,
    sft_examples,
    solve,
    vocabulary,
    written_slots,
)


def test_skills_follow_the_carries() -> None:
    assert Problem(123, 456, 3).skill == "nocarry"
    assert Problem(128, 456, 3).skill == "carry"  # units carry, tens 2 + 5 + 1 does not
    assert Problem(456, 567, 3).skill == "chain"
    assert Problem(456, 567, 3).chain == 3
    assert Problem(456, 567, 3).answer == "1 0 2 3"
    assert Problem(12, 34, 2).answer == "4 6"


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_solution_is_verified_correct(dialect: str) -> None:
    rng = random.Random(0)
    problems = sample_problems(300, digits=(1, 2, 3, 4), skills=("nocarry", "carry", "chain"),
                               seed=5)
    for problem in problems:
        for text in (solve(problem, dialect), solve(problem, dialect, rng)):
            assert exact_match(text, problem.answer), text
            assert not exact_match(text, " ".join(str(problem.a + problem.b + 1)))
            assert len(text.split()) + 1 <= max_new_tokens(problem.digits)


def test_dialects_differ_in_words_and_order() -> None:
    problem = Problem(456, 567, 3)
    a, b = solve(problem, "A"), solve(problem, "B")
    assert a.startswith("6 + 7 + 0 = 13 , write 3 carry 1 ;")
    assert b.startswith("col 7 6 c 0 gives 13 -> digit 3 next 1 |")
    assert set(a.split()) & set(b.split()) <= {str(i) for i in range(20)} | {"answer"}


def test_synonyms_vary_but_deciding_tokens_do_not() -> None:
    problem = Problem(456, 567, 3)
    texts = {solve(problem, "A", random.Random(seed)) for seed in range(20)}
    assert len(texts) > 5
    assert {t.split("answer")[-1] for t in texts} == {" 1 0 2 3"}


def test_sampling_respects_skills_digits_and_exclusions() -> None:
    held = sample_problems(50, digits=[3], skills=["chain"], seed=1)
    assert all(p.skill == "chain" and p.digits == 3 for p in held)
    drawn = sample_problems(500, digits=(2, 3), skills=("nocarry", "carry"), seed=2,
                            exclude={(p.a, p.b) for p in held})
    assert len({(p.a, p.b) for p in drawn}) == 500
    assert all(p.skill != "chain" for p in drawn)
    assert not {(p.a, p.b) for p in drawn} & {(p.a, p.b) for p in held}
    assert drawn == sample_problems(500, digits=(2, 3), skills=("nocarry", "carry"), seed=2,
                                    exclude={(p.a, p.b) for p in held})
    with pytest.raises(OPDError, match="skills"):
        sample_problems(1, digits=[2], skills=["nope"], seed=0)
    with pytest.raises(OPDError, match="could not draw"):
        sample_problems(100, digits=[1], skills=["nocarry"], seed=0)


def test_records_round_trip_to_problems() -> None:
    problem = Problem(456, 567, 3)
    record = problem.record()
    assert record.messages == [{"role": "user", "content": "456 + 567"}]
    assert record.meta["skill"] == "chain"
    assert problem_from_record(record) == problem
    [(rec, text)] = sft_examples([record], "B", seed=0)
    assert rec is record and exact_match(text, record.answer)


def test_templates_pose_the_same_problem_differently() -> None:
    record = Problem(456, 567, 3).record()
    one = render_prompt(record.messages, build_tokenizer(1))
    two = render_prompt(record.messages, build_tokenizer(2))
    assert one.split() == ["<bos>", "user", ":", "4", "5", "6", "+", "5", "6", "7",
                           "assistant", ":"]
    assert two.split() == ["<bos>", "question", ":", "add", "4", "5", "6", "and", "5", "6",
                           "7", ".", "solution", ":"]


OTHER = World("other", dialects := (
    Dialect("X", ("carry_in", "with", "bottom", "and", "top", "yields", "total", ("keep", "save"),
                  "digit", ("send", "pass"), "carry_out", "/"), filler=("uh", "so"), filler_at=12),
    Dialect("Y", ("sum", "top", "bottom", "carry_in", "total", ("d", "low"), "digit",
                  ("c", "high"), "carry_out", "~"), filler=("mm",)),
), vocabulary(dialects))


def test_another_world_speaks_its_own_words_and_is_verified() -> None:
    problem = Problem(456, 567, 3)
    assert solve(problem, "X", world=OTHER).startswith("0 with 7 and 6 yields 13 keep 3 send 1 /")
    assert solve(problem, "Y", world=OTHER).startswith("sum 6 7 0 13 d 3 c 1 ~")
    rng = random.Random(0)
    for problem in sample_problems(100, digits=(2, 3), skills=("carry", "chain"), seed=1):
        for dialect in ("X", "Y"):
            text = solve(problem, dialect, rng, OTHER)
            assert exact_match(text, problem.answer)
            assert len(text.split()) + 1 <= max_new_tokens(problem.digits, OTHER)
    tokenizer = build_tokenizer(1, OTHER)
    assert "write" not in tokenizer.get_vocab() and {"yields", "~", "uh"} <= set(tokenizer.get_vocab())
    text = solve(problem, "X", random.Random(1), OTHER)
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_a_world_refuses_an_unknown_dialect_and_words_outside_its_vocabulary() -> None:
    with pytest.raises(OPDError, match=r"unknown dialect 'A'; choose one of \('X', 'Y'\)"):
        solve(Problem(1, 2, 1), "A", world=OTHER)
    with pytest.raises(OPDError, match=r"world 'broken' lacks words in its vocab "
                       r"\(\['with', 'yields', 'keep'\]\)"):
        World("broken", OTHER.dialects, vocabulary(OTHER.dialects[1:]))


@pytest.mark.parametrize("dialect", [d.name for d in CHOICE.dialects])
def test_every_solution_of_the_choice_world_is_verified_and_fits(dialect: str) -> None:
    rng = random.Random(0)
    for problem in sample_problems(200, digits=(1, 2, 3), skills=SKILLS, seed=5):
        for text in (solve(problem, dialect, world=CHOICE), solve(problem, dialect, rng, CHOICE)):
            assert exact_match(text, problem.answer), text
            assert len(text.split()) + 1 <= max_new_tokens(problem.digits, CHOICE)


def _first_step_words(dialect: str, draws: int = 4000) -> tuple[Counter, Counter]:
    """How often each word follows the first column's `+` (a synonym list) and which of the
    free-order steps comes first, over `draws` seeded solutions."""
    rng, after_plus, first_step = random.Random(3), Counter(), Counter()
    writes = set(CHOICE.dialect("A").column[8].first[0])
    for _ in range(draws):
        words = solve(Problem(12, 34, 2), dialect, rng, CHOICE).split()
        start = 1 if words[0] in CHOICE.dialect("A").filler else 0
        after_plus[words[start + 1]] += 1
        first_step["write" if words[start + 8] in writes else "carry"] += 1
    return after_plus, first_step


def test_choice_words_follow_zipf_and_a2_favours_other_words_in_the_same_steps() -> None:
    plus = CHOICE.dialect("A").column[1]
    harmonic = sum(1 / (i + 1) for i in range(len(plus)))
    after_plus, first_step = _first_step_words("A")
    for rank, word in enumerate(plus):  # weight 1 / (rank + 1), as Zipf's law
        assert after_plus[word] / 4000 == pytest.approx(1 / (rank + 1) / harmonic, abs=0.025)
    assert first_step["write"] / 4000 == pytest.approx(0.75, abs=0.025)
    after_plus, first_step = _first_step_words("A2")
    assert after_plus.most_common(1)[0][0] == plus[1]  # every list rotated by one
    assert after_plus[plus[0]] / 4000 == pytest.approx(1 / 8 / harmonic, abs=0.02)
    assert first_step["write"] / 4000 == pytest.approx(0.25, abs=0.025)
    a, a2 = CHOICE.dialect("A"), CHOICE.dialect("A2")
    assert set(a.words) == set(a2.words)
    assert len(written_slots(a.column)) == len(written_slots(a2.column))
    assert solve(Problem(12, 34, 2), "A2", world=CHOICE).split()[1] == plus[1]


def test_the_choice_machinery_leaves_the_zoo_worlds_draws_as_they_were() -> None:
    """The zoo's models were trained on these exact texts; the same seeds must give them."""
    texts = [solve(Problem(456, 567, 3), d, random.Random(s)) for d in DIALECTS for s in (0, 3)]
    assert texts == ZOO_TEXTS


ZOO_TEXTS = [
    "6 + 7 + 0 = 13 , put 3 carry 1 ; 5 + 6 + 1 = 12 , note 2 keep 1 ; 4 + 5 + 1 = 10 , put 0 "
    "keep 1 ; answer 1 0 2 3",
    "ok 6 + 7 + 0 = 13 , write 3 keep 1 ; 5 + 6 + 1 = 12 , put 2 hold 1 ; 4 + 5 + 1 = 10 , note "
    "0 carry 1 ; answer 1 0 2 3",
    "col 7 6 c 0 gives 13 -> emit 3 pass 1 right | col 6 5 c 1 gives 12 -> emit 2 pass 1 | col 5 "
    "4 c 1 gives 10 -> emit 0 pass 1 | answer 1 0 2 3",
    "col 7 6 c 0 gives 13 -> digit 3 fwd 1 | col 6 5 c 1 gives 12 -> emit 2 fwd 1 | col 5 4 c 1 "
    "gives 10 -> out 0 next 1 | answer 1 0 2 3",
]
"""Seeded solutions of 456 + 567 in the zoo's dialects, as the code before the choice world
wrote them."""
