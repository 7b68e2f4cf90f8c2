"""Verifiers: decide whether a response's final answer matches the reference answer.

`exact` is built in; `math` uses the optional `math-verify` package. A verifier is a function
`(response_text, answer_text) -> bool`, looked up by name in `VERIFIERS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from opd.errors import OPDError

Verifier = Callable[[str, str], bool]

ANSWER_PATTERN = re.compile(r"answer\s*[:=]?\s*(.*)$", re.IGNORECASE | re.DOTALL)
BOXED_PATTERN = re.compile(r"\\boxed\{([^{}]*)\}")


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


def math_verify_match(response: str, answer: str) -> bool:
    """Symbolic equality of the final answers through `math-verify` (install `opd[math]`)."""
    try:
        from math_verify import parse, verify
    except ImportError as err:
        raise OPDError(
            "verifier 'math' needs the math-verify package: pip install 'opd[math]'"
        ) from err
    gold = parse(answer if "$" in answer or "\\" in answer else f"${answer}$")
    return bool(verify(gold, parse(response)))


VERIFIERS: dict[str, Verifier] = {"exact": exact_match, "math": math_verify_match}


def get_verifier(name: str) -> Verifier:
    try:
        return VERIFIERS[name]
    except KeyError:
        raise OPDError(
            f"verifier: unknown name {name!r}; choose one of {sorted(VERIFIERS)}"
        ) from None
