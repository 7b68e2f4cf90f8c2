"""The study's eight findings, and opd's own control of whether the teacher matters (finding 9,
run when named),
before anything is run (docs/method.md#reproduce). Pure functions of the experiments' results.

A claim's quantity is computed once per seed (seeds pair across experiments: seed k of one run
with seed k of another); its 95% interval over seeds is then held against the rule. Besides the
judged claims, each finding reports context numbers (the teachers' accuracies, the overlap at
other k) that are shown, not judged.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opd import metrics as M
from opd.doctor.control import teacher_share
from opd.study.experiments import ReproduceProfile
from opd.study.stats import Rule, combine, interval

Results = Mapping[str, Sequence[Mapping[str, Any]]]
"""Experiment name → its result for each seed, in seed order."""
PerSeed = Callable[[Results, ReproduceProfile], list[float]]

EQUIVALENCE = 0.1
"""Margin of "about the same" in gap recovery and AUROC: a tenth of the range."""


@dataclass(frozen=True)
class Claim:
    text: str
    quantity: str
    rule: Rule
    values: PerSeed = field(repr=False)


@dataclass(frozen=True)
class Finding:
    number: int
    slug: str
    title: str
    study: str
    experiments: tuple[str, ...]
    claims: tuple[Claim, ...]
    context: Mapping[str, PerSeed] = field(default_factory=dict, repr=False)


# -- per-seed quantities ----------------------------------------------------------------------
def field_of(name: str, key: str) -> PerSeed:
    return lambda r, p: [float(x[key]) for x in r[name]]


def recovery(name: str) -> PerSeed:
    return field_of(name, "gap_recovery")


def minus(a: PerSeed, b: PerSeed, times: float = 1.0) -> PerSeed:
    return lambda r, p: [x - times * y for x, y in zip(a(r, p), b(r, p), strict=True)]


def lowest(*parts: PerSeed) -> PerSeed:
    return lambda r, p: [min(xs) for xs in zip(*(f(r, p) for f in parts), strict=True)]


def _values(series: Sequence[float | None]) -> list[float]:
    return [v for v in series if v is not None]


def window_mean(series: Sequence[float | None], window: int, last: bool) -> float:
    """Mean of the first (or last) `window` logged values of a per-step series."""
    values = _values(series)
    part = values[-window:] if last else values[:window]
    return sum(part) / len(part)


def change(name: str, metric: str) -> PerSeed:
    """Last window's mean minus the first window's, per seed."""
    def values(r: Results, p: ReproduceProfile) -> list[float]:
        return [window_mean(x["series"][metric], p.window, True)
                - window_mean(x["series"][metric], p.window, False) for x in r[name]]
    return values


def first_window(name: str, metric: str) -> PerSeed:
    return lambda r, p: [window_mean(x["series"][metric], p.window, False) for x in r[name]]


def run_mean(name: str, metric: str) -> PerSeed:
    """Mean of a per-step series over the whole run, per seed."""
    def values(r: Results, p: ReproduceProfile) -> list[float]:
        return [statistics.fmean(_values(x["series"][metric])) for x in r[name]]
    return values


def teacher_dependence(name: str, control: str) -> PerSeed:
    """Share of a run's gain that depends on the teacher (`control.teacher_share` of the gap
    recoveries: the gap is the same), per seed (seeds pair: the same prompt order and
    rollouts' seed); 0 for a run with no gain, of which no share can need the teacher."""
    def values(r: Results, p: ReproduceProfile) -> list[float]:
        shares = [teacher_share(x["gap_recovery"], y["gap_recovery"])
                  for x, y in zip(r[name], r[f"{name}-{control}"], strict=True)]
        return [0.0 if share is None else share for share in shares]
    return values


def retained_rl_gain(r: Results, p: ReproduceProfile) -> list[float]:
    """Share of the RL student's lead over its pre-RL checkpoint left after OPD from it."""
    return [(x["after"] - x["teacher"]) / (x["before"] - x["teacher"]) for x in r["opd-reverse"]]


def advantage_decay(name: str) -> PerSeed:
    """The teacher's continuation advantage from the prompt minus from the deepest cut."""
    return lambda r, p: [x["continuation"][0]["advantage"] - x["continuation"][-1]["advantage"]
                         for x in r[name]]


def probe(name: str, k: int, key: str, after: bool) -> PerSeed:
    """An overlap measure at top-k of a diagnosis (before) or of a run's trained student."""
    def values(r: Results, p: ReproduceProfile) -> list[float]:
        return [float((x["probe_after"] if after else x)["by_k"][str(k)][key]) for x in r[name]]
    return values


def entropy_change(trial: str) -> PerSeed:
    return lambda r, p: [x["entropy_change"][trial] for x in r["select-prompts-template2"]]


def step0(kind: str) -> PerSeed:
    return lambda r, p: [x["step0_overlap"][kind] for x in r["select-prompts-template2"]]


ABOVE0, BELOW0, SAME = Rule("above", 0.0), Rule("below", 0.0), Rule("within", EQUIVALENCE)

FINDINGS: tuple[Finding, ...] = (
    Finding(
        1, "compatibility", "Thinking-pattern compatibility",
        "At similar accuracy, a teacher with the student's thinking pattern lifts it; one with "
        "another pattern does not, or harms it.",
        ("opd-aligned", "opd-foreign"),
        (Claim("the compatible teacher lifts the student", "gap recovery, teacher-aligned",
               ABOVE0, recovery("opd-aligned")),
         Claim("the incompatible teacher does not lift it", "gap recovery, teacher-foreign",
               Rule("below", 0.1), recovery("opd-foreign"))),
        {"teacher-aligned accuracy": field_of("opd-aligned", "teacher"),
         "teacher-foreign accuracy": field_of("opd-foreign", "teacher")},
    ),
    Finding(
        2, "novelty", "Novelty, and reverse distillation",
        "Gap recovery from a teacher with new capability ≫ from a same-pipeline teacher (58.6% "
        "vs 15.6%; 16.9% vs 5.3%); distilling an RL student from its pre-RL checkpoint erases "
        "the RL gain.",
        ("opd-aligned", "opd-same-pipeline", "opd-reverse"),
        (Claim("new capability recovers at least twice the same-pipeline share",
               "recovery(aligned) − 2 × recovery(same-pipeline)", ABOVE0,
               minus(recovery("opd-aligned"), recovery("opd-same-pipeline"), 2.0)),
         Claim("reverse distillation erases most of the RL gain",
               "share of the RL gain retained after OPD from the pre-RL checkpoint",
               Rule("below", 0.5), retained_rl_gain)),
        {"recovery, teacher-aligned": recovery("opd-aligned"),
         "recovery, teacher-same-pipeline": recovery("opd-same-pipeline"),
         "same-pipeline: teacher − student on its set":
             minus(field_of("opd-same-pipeline", "teacher"), field_of("opd-same-pipeline", "before")),
         "student-rl's accuracy before OPD from student-prerl": field_of("opd-reverse", "before"),
         "student-rl's accuracy after it": field_of("opd-reverse", "after")},
    ),
    Finding(
        3, "dynamics", "Dynamics of a succeeding and a failing run",
        "In a succeeding run the overlap ratio rises (72% → 91%), the overlap-token advantage "
        "goes to 0 and the entropy gap shrinks; in a failing run they stay flat.",
        ("opd-aligned", "opd-foreign", "diagnose-aligned", "diagnose-foreign"),
        (Claim("succeeding run: the overlap ratio rises", "Δ overlap ratio (top-k of training), "
               "teacher-aligned", ABOVE0, change("opd-aligned", M.OVERLAP_RATIO)),
         Claim("succeeding run: the overlap-token advantage rises toward 0",
               "Δ overlap-token advantage, teacher-aligned", ABOVE0,
               change("opd-aligned", M.OVERLAP_TOKEN_ADVANTAGE)),
         Claim("succeeding run: the entropy gap shrinks", "Δ entropy gap, teacher-aligned",
               BELOW0, change("opd-aligned", M.ENTROPY_GAP)),
         Claim("failing run: the overlap ratio stays flat", "Δ overlap ratio, teacher-foreign",
               SAME, change("opd-foreign", M.OVERLAP_RATIO))),
        {**{f"change of the overlap ratio at top-{k} (after − before the run), aligned":
            minus(probe("opd-aligned", k, M.OVERLAP_RATIO, True),
                  probe("diagnose-aligned", k, M.OVERLAP_RATIO, False)) for k in (1, 2, 4, 8, 16)},
         **{f"change of the overlap share at top-{k} (student mass), aligned":
            minus(probe("opd-aligned", k, "overlap_share_student", True),
                  probe("diagnose-aligned", k, "overlap_share_student", False)) for k in (1, 4, 16)},
         "Δ overlap-token advantage, teacher-foreign": change("opd-foreign", M.OVERLAP_TOKEN_ADVANTAGE),
         "Δ entropy gap, teacher-foreign": change("opd-foreign", M.ENTROPY_GAP)},
    ),
    Finding(
        4, "overlap-mass", "The shared tokens carry the mass",
        "The tokens in both models' top-k carry 97–99% of the probability mass.",
        ("opd-aligned", "opd-foreign"),
        (Claim("student mass on the shared top-k", "mean over the run, teacher-aligned",
               Rule("above", 0.95), run_mean("opd-aligned", M.OVERLAP_MASS_STUDENT)),
         Claim("teacher mass on the shared top-k", "mean over the run, teacher-aligned",
               Rule("above", 0.95), run_mean("opd-aligned", M.OVERLAP_MASS_TEACHER))),
        {"student mass, teacher-foreign": run_mean("opd-foreign", M.OVERLAP_MASS_STUDENT),
         "teacher mass, teacher-foreign": run_mean("opd-foreign", M.OVERLAP_MASS_TEACHER)},
    ),
    Finding(
        5, "signal", "Where the signal lives",
        "The top-k loss restricted to the shared tokens ≈ the full student top-k loss; the loss "
        "on the non-shared tokens alone ≪ both.",
        ("opd-aligned", "opd-overlap-only", "opd-non-overlap-only"),
        (Claim("overlap tokens only ≈ the student's whole top-k",
               "recovery(overlap only) − recovery(student top-k)", SAME,
               minus(recovery("opd-overlap-only"), recovery("opd-aligned"))),
         Claim("non-overlap tokens only ≪ both", "min(recovery of the two) − 2 × recovery(non-overlap "
               "only)", ABOVE0, minus(lowest(recovery("opd-overlap-only"), recovery("opd-aligned")),
                                      recovery("opd-non-overlap-only"), 2.0))),
        {"recovery, student top-k": recovery("opd-aligned"),
         "recovery, overlap only": recovery("opd-overlap-only"),
         "recovery, non-overlap only": recovery("opd-non-overlap-only")},
    ),
    Finding(
        6, "granularity", "Granularity of the signal",
        "Sampled-token ≈ top-4 ≈ top-16 ≈ top-64 > top-1.",
        ("opd-sampled", "opd-top1", "opd-top4", "opd-top16", "opd-top64"),
        (*(Claim(f"{other} ≈ top-4", f"recovery({other}) − recovery(top-4)", SAME,
                 minus(recovery(f"opd-{other.replace('-', '')}"), recovery("opd-top4")))
           for other in ("sampled", "top-16", "top-64")),
         Claim("all of them > top-1", "min(recovery of sampled, top-4, 16, 64) − recovery(top-1)",
               ABOVE0, minus(lowest(*(recovery(f"opd-{n}") for n in ("sampled", "top4", "top16",
                                                                      "top64"))),
                             recovery("opd-top1")))),
        {f"recovery, {n}": recovery(f"opd-{n}") for n in ("sampled", "top1", "top4", "top16", "top64")},
    ),
    Finding(
        7, "recipes", "The recipes",
        "The off-policy cold start raises the starting overlap and the final accuracy of a failing "
        "pair; teacher-aligned prompts (template, then content) raise the starting alignment; "
        "mixing in other prompts keeps the student's entropy from collapsing.",
        ("opd-foreign", "cold-start-foreign", "select-prompts-template2"),
        (Claim("cold start raises the starting overlap", "first-window overlap ratio, cold start − "
               "plain OPD (teacher-foreign)", ABOVE0,
               minus(first_window("cold-start-foreign", M.OVERLAP_RATIO),
                     first_window("opd-foreign", M.OVERLAP_RATIO))),
         Claim("cold start raises the final accuracy", "accuracy after OPD, cold start − plain OPD",
               ABOVE0, minus(field_of("cold-start-foreign", "after"), field_of("opd-foreign", "after"))),
         Claim("the teacher's template raises the step-0 overlap", "overlap ratio, teacher's − "
               "student's template (teacher-aligned-template2)", ABOVE0,
               minus(step0("teacher_template"), step0("student_template"))),
         Claim("selected content raises it further", "overlap ratio on fresh rollouts, selected − "
               "all candidates", ABOVE0, minus(step0("selected"), step0("all_candidates"))),
         Claim("mixing in other prompts keeps entropy from collapsing", "trial entropy change, "
               "kept + mixed − kept only", ABOVE0,
               minus(entropy_change("selected"), entropy_change("kept_only")))),
        {"accuracy after SFT (cold start)": field_of("cold-start-foreign", "after_sft"),
         "accuracy after OPD (cold start)": field_of("cold-start-foreign", "after"),
         "accuracy after OPD (plain, foreign)": field_of("opd-foreign", "after")},
    ),
    Finding(
        8, "horizons", "Long horizons",
        "The teacher's continuation advantage decays with the depth at which it takes over "
        "(+0.37 at 1K tokens → +0.02 at 16K); the sequence-level reward's AUROC is about the same "
        "for a failing and a succeeding teacher (0.73 vs 0.75).",
        ("diagnose-aligned", "diagnose-foreign"),
        (Claim("the continuation advantage decays with depth", "advantage from the prompt − from "
               "the deepest cut, teacher-aligned", ABOVE0, advantage_decay("diagnose-aligned")),
         Claim("AUROC about the same for failing and succeeding teachers",
               "AUROC(teacher-aligned) − AUROC(teacher-foreign)", SAME,
               minus(field_of("diagnose-aligned", "auroc"), field_of("diagnose-foreign", "auroc")))),
        {"AUROC, teacher-aligned": field_of("diagnose-aligned", "auroc"),
         "AUROC, teacher-foreign": field_of("diagnose-foreign", "auroc"),
         "advantage decay, teacher-foreign": advantage_decay("diagnose-foreign")},
    ),
)
"""The study's findings: what `opd reproduce` runs by default."""
OWN_FINDINGS: tuple[Finding, ...] = (
    Finding(
        9, "teacher-dependence", "Does the teacher matter? (opd's control, not the study's)",
        "Not a claim of the study: the same run with a signal that carries no teacher information "
        "(a constant advantage, or the teacher's log-probs shuffled across positions) recovers "
        "much less of the gap, so the gain comes from what the teacher knows.",
        ("opd-aligned", "opd-aligned-constant", "opd-aligned-shuffled", "opd-foreign",
         "opd-foreign-constant", "opd-foreign-shuffled"),
        tuple(Claim(f"most of the aligned teacher's gain needs its signal ({control} control)",
                    f"(recovery − recovery, {control}) / recovery, teacher-aligned",
                    Rule("above", 0.5), teacher_dependence("opd-aligned", control))
              for control in ("constant", "shuffled")),
        {**{f"recovery, {name.removeprefix('opd-')}": recovery(name)
            for name in ("opd-aligned", "opd-aligned-constant", "opd-aligned-shuffled", "opd-foreign",
                         "opd-foreign-constant", "opd-foreign-shuffled")},
         **{f"recovery − recovery under the {control} control, teacher-foreign":
            minus(recovery("opd-foreign"), recovery(f"opd-foreign-{control}"))
            for control in ("constant", "shuffled")}},
    ),
)
"""opd's own questions of the zoo, beyond the study's: run when named (`--only`)."""
ALL_FINDINGS = (*FINDINGS, *OWN_FINDINGS)
BY_SLUG = {f.slug: f for f in ALL_FINDINGS}


def judge(finding: Finding, results: Results, profile: ReproduceProfile) -> dict[str, Any]:
    """Each claim's per-seed values, interval, rule and verdict, the finding's verdict, and the
    context numbers."""
    claims = []
    for claim in finding.claims:
        values = claim.values(results, profile)
        value = interval(values)
        claims.append({"claim": claim.text, "quantity": claim.quantity, "rule": str(claim.rule),
                       "rule_kind": claim.rule.kind, "rule_bound": claim.rule.bound,
                       "per_seed": values, "value": value.as_dict(),
                       "verdict": claim.rule.verdict(value)})
    context = {}
    for label, get in finding.context.items():
        values = get(results, profile)
        context[label] = {"per_seed": values, "value": interval(values).as_dict()}
    return {"number": finding.number, "slug": finding.slug, "title": finding.title,
            "study": finding.study, "experiments": list(finding.experiments), "claims": claims,
            "context": context, "verdict": combine([c["verdict"] for c in claims])}
