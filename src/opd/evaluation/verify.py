"""Verifiers: decide whether a response's final answer matches the reference answer.

`exact` and `number` are built in; `math` uses the optional `math-verify` package. A verifier is a function
`(response_text, answer_text) -> bool`, looked up by name in `VERIFIERS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from opd.config import choices
from opd.errors import OPDError
from opd.runtime import is_installed

Verifier = Callable[[str, str], bool]

ANSWER_PATTERN = re.compile(r"answer\s*[:=]?\s*(.*)$", re.IGNORECASE | re.DOTALL)
BOXED_PATTERN = re.compile(r"\\boxed\{([^{}]*)\}")
NUMBER_PATTERN = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def _normalise(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).lower()


def extract_answer(response: str) -> str:
    """The final answer of a response: the last `\\boxed{…}`, else what follows the last
    'answer' marker up to the end of that line, else the last non-empty line."""
    boxed = BOXED_PATTERN.findall(response)
    if boxed:
        return boxed[-1]
    idx = response.lower().rfind("answer")
    if idx >= 0:
        match = ANSWER_PATTERN.match(response[idx:])
        if match:
            return match.group(1).split("\n")[0]
    lines = [line for line in response.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def exact_match(response: str, answer: str) -> bool:
    """True when the extracted final answer equals the reference, whitespace and case aside."""
    return _normalise(extract_answer(response)) == _normalise(answer)


def _last_number(text: str) -> float | None:
    numbers = NUMBER_PATTERN.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def number_match(response: str, answer: str) -> bool:
    """True when the response's last number (in its last `\\boxed{…}` when it has one) equals
    the reference's value: pretrained models write `12 + 35 = 47.` or `The sum is 47`, not an
    answer line. A reference that holds no number is matched as `exact` does."""
    expected = _last_number(answer)
    if expected is None:
        return exact_match(response, answer)
    boxed = BOXED_PATTERN.findall(response)
    return _last_number(boxed[-1] if boxed else response) == expected


MATH_EXTRA = 'verifier: math needs the math-verify package: pip install "opd[math]"'


def math_verify_match(response: str, answer: str) -> bool:
    """Mathematical equality of the final answers through `math-verify` (install `opd[math]`):
    the response's last `\\boxed{…}` (else its last expression) against the reference, so
    `\\frac{1}{2}`, `1/2` and `0.5` all match, in LaTeX or plain text."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise OPDError(MATH_EXTRA) from None
    gold = parse(answer if "$" in answer or "\\" in answer else f"${answer}$")
    return bool(verify(gold, parse(response)))


VERIFIERS: dict[str, Verifier] = {"exact": exact_match, "number": number_match,
                                  "math": math_verify_match}
assert tuple(VERIFIERS) == choices.VERIFIERS


REQUIRES = {"math": "math_verify"}
"""The package each optional verifier needs."""


def get_verifier(name: str) -> Verifier:
    """The verifier called `name`; an OPDError naming the extra when its package is missing,
    so a run stops before it loads a model."""
    if name not in VERIFIERS:
        raise OPDError(f"verifier: unknown name {name!r}; choose one of {sorted(VERIFIERS)}")
    if name in REQUIRES and not is_installed(REQUIRES[name]):
        raise OPDError(MATH_EXTRA)
    return VERIFIERS[name]

