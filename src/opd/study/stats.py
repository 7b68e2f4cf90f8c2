"""Means with 95% intervals over seeds, and the three-way verdict of a claim on one. Pure
functions: no models, no I/O.

An interval is Student's t interval of the mean over seeds (n − 1 degrees of freedom); with one
seed it is unbounded, so no claim can be decided from it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

REPRODUCES, DOES_NOT, INCONCLUSIVE = "reproduces", "does not", "inconclusive"
VERDICTS = (REPRODUCES, DOES_NOT, INCONCLUSIVE)


@functools.cache
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with `df` degrees of freedom, by bisection on
    its distribution function (the density integrated with Simpson's rule)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df ≥ 1, got p={p}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    def upper_half_mass(x: float, steps: int = 2000) -> float:
        h = x / steps
        inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
        return h / 3 * (density(0.0) + inner + density(x))

    low, high = 0.0, 1.0
    while 0.5 + upper_half_mass(high) < p:
        low, high = high, 2 * high
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if 0.5 + upper_half_mass(mid) < p else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    """Mean of per-seed values with its 95% interval (low, high; ±inf with one seed)."""

    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int | None]:
        bounded = math.isfinite(self.low)
        return {"mean": self.mean, "low": self.low if bounded else None,
                "high": self.high if bounded else None, "n": self.n}


def interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and t interval of `values` (one per seed)."""
    if not values:
        raise ValueError("interval of no values")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


@dataclass(frozen=True)
class Rule:
    """A claim about one measured quantity, fixed before the run: its interval lies `above` or
    `below` `bound`, or `within` ±`bound` (the two are the same up to that margin)."""

    kind: str
    bound: float

    def __post_init__(self) -> None:
        if self.kind not in ("above", "below", "within"):
            raise ValueError(f"rule kind {self.kind!r}")

    def __str__(self) -> str:
        if self.kind == "within":
            return f"95% interval within ±{self.bound:g}"
        return f"95% interval {self.kind} {self.bound:g}"

    def verdict(self, value: Interval) -> str:
        """reproduces when the whole interval satisfies the claim, does not when the whole
        interval contradicts it, inconclusive when it straddles the bound."""
        low, high, bound = value.low, value.high, self.bound
        if self.kind == "above":
            return REPRODUCES if low > bound else DOES_NOT if high < bound else INCONCLUSIVE
        if self.kind == "below":
            return REPRODUCES if high < bound else DOES_NOT if low > bound else INCONCLUSIVE
        if -bound < low and high < bound:
            return REPRODUCES
        return DOES_NOT if low > bound or high < -bound else INCONCLUSIVE


def combine(verdicts: Sequence[str]) -> str:
    """A finding of several claims reproduces when every claim does, does not when any claim
    does not, and is inconclusive otherwise."""
    if any(v == DOES_NOT for v in verdicts):
        return DOES_NOT
    return REPRODUCES if verdicts and all(v == REPRODUCES for v in verdicts) else INCONCLUSIVE
