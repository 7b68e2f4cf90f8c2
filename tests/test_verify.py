"""Answer verifiers: `exact` and `math` (math-verify) on a small math prompt set written here:
boxed answers, fractions against decimals, LaTeX against plain text."""

from __future__ import annotations

import importlib
import json
import sys
from types import SimpleNamespace

import math_verify  # noqa: F401  (the dev extra installs it)
import pytest
import torch

from opd.cli import main
from opd.data.prompts import load_prompts
from opd.errors import OPDError
from opd.evaluation.verify import exact_match, extract_answer, get_verifier

MATH = [
    # (prompt, reference answer, a correct response in another form, a wrong response)
    ("What is 1/2 as a decimal?", "0.5", "Halving 1 gives \\boxed{\\frac{1}{2}}.", "\\boxed{0.25}"),
    ("Write 0.75 as a fraction.", "\\frac{3}{4}", "So the answer is \\boxed{3/4}", "\\boxed{4/3}"),
    ("What is 2/3 + 1/3?", "1", "We get $\\frac{2}{3}+\\frac{1}{3} = 1$", "The answer is 2"),
    ("Compute 3 * 4.", "12", "3 * 4 = \\boxed{12.0}", "\\boxed{7}"),
    ("Expand (x+1)^2.", "x^2+2x+1", "\\boxed{(x+1)^{2}}", "\\boxed{x^2+1}"),
    ("What is the square root of 16?", "4", "\\boxed{\\sqrt{16}}", "\\boxed{\\sqrt{8}}"),
    ("One third as a fraction?", "1/3", "\\boxed{\\dfrac{1}{3}}", "\\boxed{0.33}"),
]


@pytest.fixture
def math_prompts(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a, _, _ in MATH))
    return path


def test_math_accepts_equal_values_in_any_form_and_rejects_others(math_prompts):
    records = load_prompts(math_prompts)
    check = get_verifier("math")
    for record, (_, _, right, wrong) in zip(records, MATH, strict=True):
        assert check(right, record.answer), (right, record.answer)
        assert not check(wrong, record.answer), (wrong, record.answer)
    # The exact verifier takes the same responses only when written the reference's way.
    assert sum(exact_match(right, r.answer) for r, (_, _, right, _) in zip(records, MATH, strict=True)) == 0
    assert exact_match("so \\boxed{12}", "12") and extract_answer("answer: 7\nthanks") == "7"


def test_evaluation_with_the_math_verifier(math_prompts, monkeypatch):
    """avg@n through `evaluate`, the model's samples replaced by the responses above."""
    evaluate_module = importlib.import_module("opd.evaluation.accuracy")

    def rollouts(engine, model, tokenizer, texts, *, n, **options):
        texts_out = [t for _, _, right, wrong in MATH for t in (right, wrong)]
        return SimpleNamespace(texts=texts_out, prompt_index=torch.arange(len(MATH)).repeat_interleave(n),
                               response_lengths=torch.ones(len(texts_out)),
                               truncated=torch.zeros(len(texts_out), dtype=torch.bool))

    monkeypatch.setattr(evaluate_module, "generate", rollouts)
    tokenizer = SimpleNamespace(chat_template=None)
    records = load_prompts(math_prompts)
    result = evaluate_module.evaluate(None, tokenizer, records, n=2, verifier="math")
    assert result.per_prompt == [0.5] * len(MATH) and result.accuracy == 0.5
    assert evaluate_module.evaluate(None, tokenizer, records, n=2, verifier="exact").accuracy == 0.0


def test_a_missing_math_verify_is_one_line_before_any_model_loads(tmp_path, math_prompts,
                                                                   monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(OPDError, match=r'math needs the math-verify package: pip install "opd\[math\]"'):
        get_verifier("math")
    code = main(["eval", "--model", str(tmp_path / "no-model"), "--prompts", str(math_prompts),
                 "--verifier", "math"])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install "opd[math]"' in err and "no-model" not in err


@pytest.mark.parametrize(("response", "answer", "right"), [
    ("12 + 35 = 47.", "47", True),                      # a sum written out, no answer line
    ("The sum of 12 and 35 is 47", "47", True),
    ("First 10 + 30 = 40, then 2 + 5 = 7, so 47.", "47", True),  # the last number counts
    ("It is 47, or maybe 48", "47", False),
    ("\\boxed{1,234} and then 5", "1234", True),        # the boxed answer first, commas dropped
    ("-3.50", "-3.5", True),
    ("twelve", "12", False),                             # no number at all
    ("answer: blue", "blue", True),                      # a reference without a number: exact
    ("answer: red", "blue", False),
])
def test_number_compares_the_last_number_of_the_response(response, answer, right):
    assert get_verifier("number")(response, answer) is right
