"""The verdict of `opd diagnose` as pure functions: statistics, thresholds and rules.

Everything here maps numbers to numbers or to a verdict; no model, no I/O, so each rule is
tested on hand-made measures. Thresholds live in one frozen dataclass; each is chosen from a
principle (a majority, a noise band, a smallest effect worth a training run), not by fitting
the model organisms, and every decision records how far the measured value sits from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from opd.config.settings import Config, setting

VERDICTS = ("go", "pattern-mismatch", "no-novelty", "horizon-risk")


@dataclass(frozen=True)
class Thresholds(Config):
    """What counts as enough, for each check. Every field is a plain number in diagnosis.json."""

    z: float = setting(2.0, """Standard errors that make a difference real (about 95%,
        two-sided). Accuracy differences, continuation advantages and the template gap are only
        called positive or negative beyond z·SE: below it they are indistinguishable from
        sampling noise.""", above=0)
    pattern_k: int = setting(4, """Top-k used for the pattern check. A next token of reasoning
        text has a handful of plausible choices; k = 4 covers them without reaching into the
        tail, where top-k sets of unrelated models overlap by chance once k is a sizeable share
        of a small vocabulary.""", minimum=1)
    min_overlap_share: float = setting(0.5, """Least share of each model's own top-k
        probability that sits on tokens both rank in their top-k (the smaller of the student and
        teacher sides; 1 for a model against itself). Below one half, at the student's own
        states, most of what one model would say is not among what the other would say: the two
        think in different patterns (the study reports 97–99% overlap mass for pairs that
        work).""", minimum=0, maximum=1)
    min_novelty: float = setting(0.05, """Smallest teacher accuracy advantage, on prompts the
        student never solves, that is worth a training run (5 points of accuracy). Below it — or
        within z·SE of zero — the teacher cannot do from the student's states what the student
        cannot.""", minimum=0, maximum=1)
    horizon_fraction: float = setting(0.5, """The continuation advantage must last at least
        this share of a typical response: when it is gone before half of the response, most
        dense rewards sit where the teacher no longer knows better and the length should be
        capped.""", minimum=0,
        maximum=1)
    min_template_gap: float = setting(0.05, """Nats per response token by which the teacher
        must prefer its own prompt template (beyond z·SE) for the template check to fire: a
        shift of 5% in per-token likelihood, applied to every reward of every rollout.""",
        minimum=0)


def mean_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean (None for an empty list, SE 0 for one value)."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def clustered_mean_se(values: Sequence[float], clusters: Sequence[int]) -> dict[str, Any]:
    """Mean of `values` and its standard error with clusters (prompts) as the unit: rollouts
    of one prompt are correlated, so the SE comes from the per-cluster means."""
    groups: dict[int, list[float]] = {}
    for value, cluster in zip(values, clusters, strict=True):
        groups.setdefault(cluster, []).append(value)
    means = [sum(g) / len(g) for g in groups.values()]
    mean, se = mean_se(means)
    return {"mean": mean, "se": se, "n": len(values), "clusters": len(groups)}


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Probability that a positive outscores a negative (ties count half), from ranks;
    None when either class is empty."""
    pairs = sorted(zip(scores, labels, strict=True), key=lambda p: p[0])
    n_pos = sum(1 for _, label in pairs if label)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        mid_rank = (i + j + 1) / 2  # 1-based average rank of the tied block
        rank_sum += mid_rank * sum(1 for _, label in pairs[i:j] if label)
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def horizon(curve: Sequence[dict[str, Any]], z: float) -> dict[str, Any] | None:
    """The first depth at which the continuation advantage is no longer above z·SE.

    `curve`: one entry per depth, shallow to deep, with `advantage` ({mean, se}), `depth`,
    `tokens` (median cut in tokens) and `fraction` (median cut as a share of the response).
    None when the advantage stays significant at every measured depth (no horizon within them)."""
    for point in curve:
        mean, se = point["advantage"]["mean"], point["advantage"]["se"]
        if mean is None or mean <= z * (se or 0.0):
            return {"tokens": point["tokens"], "fraction": point["fraction"], "depth": point["depth"]}
    return None


@dataclass
class Decision:
    """The verdict, the checks behind it (value, threshold, margin) and what to do."""

    verdict: str
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(value: float | None, threshold: float, passed: bool | None, note: str) -> dict[str, Any]:
    margin = None if value is None else value - threshold
    return {"value": value, "threshold": threshold, "margin": margin, "passed": passed, "note": note}


def pattern_check(share: float, thresholds: Thresholds) -> dict[str, Any]:
    """The thinking-pattern check (value, threshold, margin, passed): the overlap share at
    `pattern_k` against `min_overlap_share`. Shared by the verdict and the cold start's gate."""
    return _check(share, thresholds.min_overlap_share, share >= thresholds.min_overlap_share,
                  f"min overlap share (student, teacher) at top-{thresholds.pattern_k} on the "
                  "student's rollouts")


def decide(summary: dict[str, Any], thresholds: Thresholds) -> Decision:
    """Verdict from the measured summary, first failing condition wins:
    pattern-mismatch, then no-novelty, then horizon-risk, else go.

    `summary` keys: `overlap_share` (min of both sides at pattern_k), `novelty` ({mean, se} of
    the advantage on unsolved prompts, or None without answers), `advantage` ({mean, se} on
    all prompts at the shallowest depth, or None), `horizon_fraction` (None = no horizon
    within the measured depths), `template` ({gap, se, applies}), `across_tokenizers` (True for
    a teacher with another tokenizer, which OPD always shows its own rendering: no template
    advice)."""
    t = thresholds
    checks: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    advice: list[str] = []

    checks["pattern"] = pattern_check(summary["overlap_share"], t)
    pattern_ok = checks["pattern"]["passed"]

    template = summary.get("template")
    template_fires = False
    if template and template.get("applies"):
        gap, se = template["gap"], template["se"]
        bar = max(t.min_template_gap, t.z * se)
        template_fires = gap > bar
        checks["template"] = _check(
            gap, bar, not template_fires,
            "teacher log-prob per token, own template minus the student's rendering",
        )
        if template_fires:
            warnings.append(
                f"template: the teacher scores the student's responses {gap:.3f} nats/token higher "
                "under its own chat template; with the student's rendering every reward is biased"
            )
            advice.append("score with the teacher's own template (config teacher_prompt: own)")

    novelty, advantage = summary.get("novelty"), summary.get("advantage")
    novel: bool | None = None
    if novelty is not None and novelty["mean"] is not None:
        bar = max(t.min_novelty, t.z * novelty["se"])
        novel = novelty["mean"] > bar
        checks["novelty"] = _check(
            novelty["mean"], bar, novel,
            "teacher minus student continuation accuracy from the same student prefixes, "
            "on prompts none of the student's rollouts solved (shallowest depth)",
        )
    elif novelty is not None:
        novel = False
        checks["novelty"] = _check(None, t.min_novelty, False, "the student solved every prompt")
    else:
        warnings.append("novelty: prompts have no answers, so the teacher's capability on the "
                        "student's states was not measured; add an 'answer' per prompt")
    reverse = False
    if advantage is not None and advantage["mean"] is not None:
        reverse = advantage["mean"] < -t.z * advantage["se"]
        checks["advantage"] = _check(
            advantage["mean"], -t.z * advantage["se"], not reverse,
            "teacher minus student continuation accuracy on all prompts (shallowest depth)",
        )
        if reverse:
            warnings.append(
                "reverse distillation: from the student's own states the teacher is less accurate "
                f"than the student ({advantage['mean']:+.3f}); OPD would pull the student back "
                "toward the teacher"
            )

    fraction = summary.get("horizon_fraction")
    short = False
    if novel:
        short = fraction is not None and fraction < t.horizon_fraction
        checks["horizon"] = _check(
            fraction, t.horizon_fraction, not short,
            "depth (share of the response) where the continuation advantage falls to zero",
        )

    if not pattern_ok:
        verdict = "pattern-mismatch"
        advice.insert(0, "off-policy cold start: fine-tune the student on the teacher's verified "
                         "responses first, then run OPD (`opd cold-start`)")
        if not template_fires and not summary.get("across_tokenizers"):
            advice.append("if the teacher was post-trained with another prompt template, use it "
                          "(teacher_prompt: own)")
    elif novel is False or reverse:
        verdict = "no-novelty"
        advice.insert(0, "this teacher has nothing to teach this student on these prompts: pick a "
                         "teacher with a capability the student lacks")
    elif short:
        verdict = "horizon-risk"
        advice.insert(0, "cap max_new_tokens near the recommended length, or mix in an outcome "
                         "reward (outcome_weight > 0)")
    else:
        verdict = "go"
    return Decision(verdict, checks, warnings, advice)
