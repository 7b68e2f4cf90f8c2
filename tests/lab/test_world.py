"""The task family: skills, both dialects' solutions verified, prompt templates."""

from __future__ import annotations

import random

import pytest

from opd.data.prompts import render_prompt
from opd.errors import OPDError
from opd.evaluation.verify import exact_match
from opd.lab.tokenizer import build_tokenizer
from opd.lab.world import (
    DIALECTS,
    Dialect,
    Problem,
    World,
    max_new_tokens,
    problem_from_record,
    sample_problems,
    sft_examples,
    solve,
    vocabulary,
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
