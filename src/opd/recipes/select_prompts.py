"""Teacher-aligned prompts (docs/method.md#recipes): the teacher's template, then prompts
ranked by alignment.

(a) Template: every candidate prompt is rendered with the teacher's prompt template (its
tokenizer's chat template, or a format string) and written as plain text; OPD then uses that
text as is (`template: "{prompt}"`, `teacher_prompt: student`), so the student rolls out, and
the teacher scores, under the template the teacher was post-trained with.
(b) Content: the student rolls out every candidate, the teacher scores those rollouts, and each
prompt gets the step-0 measures (`opd.doctor.measure.alignment_by_prompt`); the
top fraction by the chosen measures is kept and a share of other prompts is mixed in, since
aligned content alone drives student entropy down. A short OPD trial on the selected and the
unselected prompts shows that entropy effect.

Outputs in the out folder: prompts.jsonl (kept + mixed in, rendered), selection.json (per-prompt
scores, what was kept and why, step-0 measures before and after), train.yaml (the settings OPD
needs to use the rendered prompts), report.md and selection.png.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from opd import metrics as M
from opd.config.choices import ENGINES
from opd.config.fields import Generation, ModelLoading, ModelPair, PromptSource, check_template
from opd.config.settings import setting, to_dict
from opd.config.training import PROFILES, TrainConfig, build_config
from opd.data.prompts import PromptRecord, load_prompts, render_prompt, require_answers, source_of
from opd.doctor.measure import DiagnoseConfig, Pair, alignment_by_prompt, load_pair
from opd.errors import OPDError
from opd.io import check_output_folder, check_teacher_urls, fmt, write_jsonl_atomic, write_text_atomic
from opd.models.loading import context_window
from opd.run.folder import RunFolder
from opd.run.loop import run_training
from opd.run.report import save_figure
from opd.step.engines import require_engine
from opd.step.rollout import check_prompts

RANKABLE = (M.OVERLAP_RATIO, "overlap_share", M.OVERLAP_MASS_STUDENT, M.OVERLAP_MASS_TEACHER,
            M.OVERLAP_TOKEN_ADVANTAGE, "advantage")
"""Per-prompt measures a selection can rank by; higher is more aligned for each."""
STEP0 = (M.OVERLAP_RATIO, "overlap_share", M.OVERLAP_MASS_STUDENT, M.OVERLAP_MASS_TEACHER,
         M.OVERLAP_TOKEN_ADVANTAGE, M.STUDENT_ENTROPY)
"""The step-0 measures reported for each prompt set."""
USE_WITH = {"template": "{prompt}", "teacher_prompt": "student"}
"""Training settings under which the rendered prompts reach the student verbatim."""


@dataclass(frozen=True, kw_only=True)
class SelectConfig(Generation, PromptSource, ModelLoading, ModelPair):
    """Inputs and settings of one prompt selection (`opd select-prompts`)."""

    student: str = setting(help="Student model folder (or hub id).")
    teacher: str = setting(help="Teacher model folder (or hub id), or the URL of `opd "
                           "serve-teacher` (http://host:port).")
    prompts: str = setting(help="Candidate prompts (.jsonl / .parquet, a save_to_disk folder or "
                           "a hub dataset id).")
    out: str = setting(help="Output folder (must not hold a selection yet).")
    template: str = setting("teacher", "Whose prompt template the output prompts are rendered "
                            "with: teacher or student.", choices=("teacher", "student"))
    student_template: str | None = setting(None, "Format string with {prompt} instead of the "
                                           "student tokenizer's chat template.")
    teacher_template: str | None = setting(None, "Format string with {prompt} instead of the "
                                           "teacher tokenizer's chat template.")
    keep_fraction: float = setting(0.5, "Share of the candidates kept, best first.", above=0,
                                   maximum=1)
    mix_share: float = setting(0.2, "Share of the output made of other prompts.", minimum=0,
                               below=1)
    other_prompts: str | None = setting(None, "Where the mixed-in prompts come from (default: "
                                        "the candidates not kept); the same columns and "
                                        "split as prompts.")
    rank_by: tuple[str, ...] = setting(("overlap_ratio",), "Measures to rank by; several are "
                                       "combined as the mean of their percentile ranks.",
                                       choices=RANKABLE)
    num_prompts: int = setting(256, "Candidates sampled (seeded) from the file.", minimum=1)
    k: int = setting(16, "Top-k of the overlap measures.", minimum=1)
    trial_steps: int = setting(20, "OPD steps of the trial on each prompt set (0 = no trial).",
                               minimum=0)
    trial_profile: str = setting("study", "Defaults profile of the trial runs.",
                                 choices=tuple(PROFILES))
    trial_settings: dict[str, Any] = setting(
        factory=dict, help="Further training settings of the trial runs, e.g. "
        "trial_settings.lr=1e-4.")
    seed: int = setting(0, "Seed of the sampling of candidates and rollouts.")
    rollout_engine: str = setting("hf", "What generates the candidates' rollouts and the trial "
                                  "runs' (unless trial_settings says otherwise): hf or vllm "
                                  "(needs the vllm extra).", choices=ENGINES)
    batch_size: int = setting(64, "Rollouts generated and scored at a time.", minimum=1)
    progress: bool = setting(True, "Show progress bars.")

    def check(self) -> None:
        check_template(self.student_template, "student_template")
        check_template(self.teacher_template, "teacher_template")
        check_teacher_urls(teacher=self.teacher)
        if not self.rank_by:
            raise OPDError(f"config: rank_by needs at least one measure of {', '.join(RANKABLE)}")


# -- pure selection ---------------------------------------------------------------------------
def percentile_ranks(values: Sequence[float]) -> list[float]:
    """Each value's rank among `values` scaled to [0, 1]; ties share their mean rank."""
    n = len(values)
    order = sorted(range(n), key=values.__getitem__)
    ranks = [1.0] * n
    start = 0
    while start < n:
        end = start
        while end + 1 < n and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            ranks[i] = (start + end) / 2 / (n - 1) if n > 1 else 1.0
        start = end + 1
    return ranks


def combined_scores(rows: Sequence[dict[str, Any]], by: Sequence[str]) -> list[float]:
    """One measure: its values. Several: the mean of their percentile ranks."""
    columns = [[row[m] for row in rows] for m in by]
    for name, column in zip(by, columns, strict=True):
        if any(v is None for v in column):
            raise OPDError(f"--rank-by {name}: not measured for every prompt (advantage needs an "
                           "'answer' on every candidate row)")
    if len(columns) == 1:
        return [float(v) for v in columns[0]]
    ranked = [percentile_ranks(c) for c in columns]
    return [sum(r[i] for r in ranked) / len(ranked) for i in range(len(rows))]


def top_fraction(scores: Sequence[float], fraction: float) -> list[int]:
    """Indices of the ceil(fraction · N) highest scores (at least one), best first; ties go to
    the earlier index."""
    count = max(1, math.ceil(fraction * len(scores) - 1e-9))
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:count]


def mix_count(kept: int, share: float) -> int:
    """Other prompts to add to `kept` so that they make `share` of the output (nearest count)."""
    return math.floor(share * kept / (1 - share) + 0.5)


def mix_in(pool: Sequence[int], kept: int, share: float, seed: int) -> list[int]:
    """A seeded sample of `pool` of mix_count(kept, share) items (all of `pool` if fewer)."""
    return random.Random(seed).sample(list(pool), min(mix_count(kept, share), len(pool)))


def subset_means(prompts: Sequence[dict[str, Any]], indices: Sequence[int],
                 measures: Sequence[str] = STEP0) -> dict[str, float]:
    """Token means of per-prompt measures over the prompts `indices` (weighted by tokens)."""
    tokens = sum(prompts[i]["tokens"] for i in indices)
    return {m: sum(prompts[i]["tokens"] * prompts[i][m] for i in indices) / tokens for m in measures}


def entropy_effect(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Student entropy (and overlap) over a trial run's steps: first, last, mean of the last
    half, and the change from the first step to that mean."""
    entropy = [r[M.STUDENT_ENTROPY] for r in records]
    late = entropy[len(entropy) // 2 :]
    return {"steps": len(entropy), M.STUDENT_ENTROPY: entropy,
            M.OVERLAP_RATIO: [r.get(M.OVERLAP_RATIO) for r in records],
            "first": entropy[0], "last": entropy[-1], "late_mean": sum(late) / len(late),
            "change": sum(late) / len(late) - entropy[0]}


# -- rendering and files ----------------------------------------------------------------------
def as_text(records: Sequence[PromptRecord], texts: Sequence[str]) -> list[PromptRecord]:
    """Each record as its rendered text (one user message), the original messages in meta."""
    return [PromptRecord([{"role": "user", "content": t}], r.answer,
                         {**r.meta, "source_messages": r.messages}, r.source)
            for r, t in zip(records, texts, strict=True)]


def write_prompts(path: Path, records: Sequence[PromptRecord], info: Sequence[dict[str, Any]]) -> None:
    """Rows `{"prompt": rendered text, "answer", meta…, "selection": info}`, atomically."""
    rows = [{"prompt": r.messages[-1]["content"], "answer": r.answer, **r.meta, "selection": i}
            for r, i in zip(records, info, strict=True)]
    write_jsonl_atomic(path, rows)


# -- the recipe -------------------------------------------------------------------------------
def _check_distinct_ids(records: Sequence[PromptRecord], others: Sequence[PromptRecord]) -> None:
    """Mixed-in prompts must not repeat a candidate's id: the output would hold it twice."""
    ids = {json.dumps(r.meta["id"], sort_keys=True, default=str) for r in records
           if r.meta.get("id") is not None}
    for record in others:
        if record.meta.get("id") is not None:
            key = json.dumps(record.meta["id"], sort_keys=True, default=str)
            if key in ids:
                raise OPDError(f"{record.source} has the id {key} of a candidate in --prompts; "
                               "give the two files distinct ids")


def _candidates(config: SelectConfig) -> tuple[list[int], list[PromptRecord]]:
    records = load_prompts(config.prompts, **source_of(config))
    indices = list(range(len(records)))
    if config.num_prompts < len(records):
        indices = sorted(random.Random(config.seed).sample(indices, config.num_prompts))
    return indices, [records[i] for i in indices]


def _trial_config(config: SelectConfig, name: str, folder: Path) -> TrainConfig:
    """The settings of the trial run on the prompt set `name` (checked before the selection
    starts: a bad trial_settings value is refused before anything is written)."""
    forced = {"student": config.student, "teacher": config.teacher,
              "prompts": str(folder / f"{name}.jsonl"), "out": str(folder / name),
              "max_steps": max(config.trial_steps, 1), "max_new_tokens": config.max_new_tokens,
              "seed": config.seed, "save_every": max(config.trial_steps, 1), "keep_checkpoints": 1,
              "progress": config.progress, "trust_remote_code": config.trust_remote_code,
              **USE_WITH}
    try:
        engine = {"rollout_engine": config.rollout_engine, "vllm": to_dict(config.vllm)}
        return build_config(engine, config.trial_settings, forced, profile=config.trial_profile)
    except OPDError as err:
        raise OPDError(str(err).replace("config: ", "config: trial_settings.", 1)) from None


def _trial(config: SelectConfig, name: str, records: Sequence[PromptRecord], folder: Path) -> dict[str, Any]:
    """A short OPD run on `records`; its checkpoints are removed, its metrics kept."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder / name, ignore_errors=True)  # left by a selection that did not finish
    write_prompts(folder / f"{name}.jsonl", records, [{"set": name}] * len(records))
    run_training(_trial_config(config, name, folder))
    shutil.rmtree(RunFolder(folder / name).checkpoints, ignore_errors=True)
    return {"prompts": len(records), "run": str(folder / name),
            **entropy_effect(M.read(folder / name))}


@dataclass(frozen=True)
class SelectionInputs:
    """The candidates (indices into the prompt file, and their records), the prompts to mix in
    (None: unselected candidates) and the trial runs' settings (None: no trial)."""

    indices: list[int]
    records: list[PromptRecord]
    others: list[PromptRecord] | None
    trial_config: TrainConfig | None


@dataclass(frozen=True)
class SelectionModels:
    """The measuring settings and the loaded student and teacher."""

    measure: DiagnoseConfig
    student: Pair
    teacher: Pair

    def template_owner(self, config: SelectConfig) -> tuple[Pair, str | None]:
        """The model whose template renders the output prompts, and its format string."""
        if config.template == "student":
            return self.student, config.student_template
        return self.teacher, config.teacher_template


@dataclass(frozen=True)
class ScoredCandidates:
    """Every candidate rendered with each template, the step-0 measures under both, and the
    per-prompt measures and scores under the chosen one."""

    by_template: dict[str, list[PromptRecord]]
    chosen: list[PromptRecord]
    step0: dict[str, Any]
    measures: list[dict[str, Any]]
    scores: list[float]


@dataclass(frozen=True)
class Chosen:
    """The candidates kept (best first) and dropped, the pool mixed in from (rendered; with
    `pool_index` the candidate of each, when the pool is the dropped candidates), the ones
    mixed in, and the output prompts with their selection info."""

    kept: list[int]
    dropped: list[int]
    pool: list[PromptRecord]
    pool_index: list[int]
    mixed: list[int]
    output: list[PromptRecord]
    info: list[dict[str, Any]]
    warnings: list[str]


def run_select_prompts(config: SelectConfig) -> dict[str, Any]:
    """Select, write every output into `config.out` and return the selection (selection.json)."""
    out = Path(config.out)
    inputs = check_selection_inputs(config)
    bar = tqdm(total=4 + (3 if config.mix_share else 2) * bool(config.trial_steps),
               desc="opd select-prompts", disable=not config.progress)
    bar.set_postfix_str("loading models")
    models = load_models(config, inputs)
    check_selection_renderings(config, inputs, models)
    bar.update()
    candidates = score_candidates(config, inputs, models, bar)
    chosen = choose(config, inputs, models, candidates)
    out.mkdir(parents=True, exist_ok=True)
    write_prompts(out / "prompts.jsonl", chosen.output, chosen.info)
    fresh = measure_fresh_rollouts(config, inputs, models, candidates, chosen, bar)
    trial, trial_warnings = run_trials(config, candidates, chosen, bar)
    selection = selection_record(config, inputs, candidates, chosen,
                                 {**candidates.step0, "fresh_rollouts": fresh}, trial,
                                 [*chosen.warnings, *trial_warnings])
    _write_outputs(selection, out)
    bar.close()
    return selection


def check_selection_inputs(config: SelectConfig) -> SelectionInputs:
    """The out folder, engines, trial settings and prompt files, refused with one line before
    any model loads."""
    out = Path(config.out)
    check_output_folder(out, "out")
    if (out / "selection.json").exists():
        raise OPDError(f"--out: {str(out)!r} already holds a selection; choose a new folder "
                       "(nothing was changed)")
    require_engine(config.rollout_engine)
    trial_config = _trial_config(config, "selected", out / "trial") if config.trial_steps else None
    if trial_config is not None:
        require_engine(trial_config.rollout_engine, "trial_settings.rollout_engine")
    indices, records = _candidates(config)
    others = (load_prompts(config.other_prompts, "other_prompts", **source_of(config))
              if config.other_prompts else None)
    if others is not None:
        _check_distinct_ids(records, others)
    if "advantage" in config.rank_by:
        require_answers(records, "prompts", "rank_by advantage")
    return SelectionInputs(indices, records, others, trial_config)


def load_models(config: SelectConfig, inputs: SelectionInputs) -> SelectionModels:
    """Student and teacher, loaded as `opd diagnose` loads them, to measure the prompts
    rendered already (`{prompt}`) under the student's rollouts."""
    measure = DiagnoseConfig(
        student=config.student, teacher=config.teacher, prompts=config.prompts,
        student_template="{prompt}", teacher_template="{prompt}", teacher_prompt="student",
        samples_per_prompt=config.samples_per_prompt, max_new_tokens=config.max_new_tokens,
        depths=(0.0,) if "advantage" in config.rank_by else (), seed=config.seed,
        batch_size=config.batch_size, dtype=config.dtype, progress=False,
        trust_remote_code=config.trust_remote_code, rollout_engine=config.rollout_engine,
        vllm=config.vllm,
    )
    student = load_pair(config.student, "student", measure)
    teacher = load_pair(config.teacher, "teacher", measure, student)
    return SelectionModels(measure, student, teacher)


def check_selection_renderings(config: SelectConfig, inputs: SelectionInputs,
                     models: SelectionModels) -> None:
    """Every prompt renders with each model's template within its context window (and, for
    the trial, within its max_prompt_tokens) before anything is written."""
    student, teacher, others = models.student, models.teacher, inputs.others
    if config.template == "teacher" and config.teacher_template is None \
            and not getattr(teacher.tokenizer, "chat_template", None):
        raise OPDError(f"template: the prompts are to be rendered with the teacher's template, "
                       f"but the tokenizer of {config.teacher!r} has no chat template; pass "
                       "--teacher-template with {prompt}, or --template student")
    for pair, template in ((student, config.student_template), (teacher, config.teacher_template)):
        rows = inputs.records if others is None or pair.name != config.template \
            else [*inputs.records, *others]
        check_prompts(rows, pair.tokenizer, template, who=f"the {pair.name}'s rendering",
                      limit=context_window(pair.path),
                      limit_name=f"the {pair.name}'s context window", fix="shorten or remove the row")
    if inputs.trial_config is not None:
        candidates = [*inputs.records, *(others or [])]
        texts = _rendered(*models.template_owner(config), candidates)
        check_prompts(texts, student.tokenizer, "{prompt}", who="the trial's rendering",
                      limit=inputs.trial_config.max_prompt_tokens,
                      limit_name="the trial's max_prompt_tokens",
                      fix="raise trial_settings.max_prompt_tokens, or shorten or remove the row")


def _rendered(pair: Pair, template: str | None, rows: Sequence[PromptRecord]) -> list[PromptRecord]:
    """`rows` rendered by `pair`'s tokenizer (or `template`), as text."""
    return as_text(rows, [render_prompt(r.messages, pair.tokenizer, template) for r in rows])


def score_candidates(config: SelectConfig, inputs: SelectionInputs, models: SelectionModels,
                     bar: tqdm) -> ScoredCandidates:
    """The candidates rendered with both templates, each rendering measured at step 0; the
    chosen template's per-prompt measures combined into one score per candidate."""
    by_template = {
        "student": _rendered(models.student, config.student_template, inputs.records),
        "teacher": _rendered(models.teacher, config.teacher_template, inputs.records)}
    step0: dict[str, Any] = {}
    ranking: dict[str, Any] = {}
    for name, rows in by_template.items():
        bar.set_postfix_str(f"step-0 measures, {name} template")
        result = alignment_by_prompt(models.measure, rows, models.student, models.teacher,
                                     config.k)
        step0[f"{name}_template"] = {m: result["overall"][m] for m in STEP0} | {"prompts": len(rows)}
        if name == config.template:
            ranking = result
        bar.update()
    scores = combined_scores(ranking["prompts"], config.rank_by)
    return ScoredCandidates(by_template, by_template[config.template], step0, ranking["prompts"],
                            scores)


def choose(config: SelectConfig, inputs: SelectionInputs, models: SelectionModels,
           candidates: ScoredCandidates) -> Chosen:
    """The top fraction by score, and a seeded share of other prompts mixed in (the dropped
    candidates, or `other_prompts` rendered with the chosen template)."""
    scores, chosen = candidates.scores, candidates.chosen
    kept = top_fraction(scores, config.keep_fraction)
    dropped = sorted(set(range(len(inputs.records))) - set(kept))
    if inputs.others is None:
        pool, pool_index = [chosen[i] for i in dropped], dropped
    else:
        pool, pool_index = _rendered(*models.template_owner(config), inputs.others), []
    mixed = mix_in(range(len(pool)), len(kept), config.mix_share, config.seed)
    warnings = []
    if len(mixed) < mix_count(len(kept), config.mix_share):
        warnings.append(f"only {len(mixed)} other prompts to mix in (asked for "
                        f"{mix_count(len(kept), config.mix_share)}): the output's share of other "
                        f"prompts is {len(mixed) / (len(kept) + len(mixed)):.3f}")
    output = [chosen[i] for i in kept] + [pool[i] for i in mixed]
    info = [{"role": "kept", "rank": r + 1, "score": scores[i], "candidate": inputs.indices[i]}
            for r, i in enumerate(kept)]
    info += [{"role": "mixed",
              "candidate": inputs.indices[pool_index[i]] if inputs.others is None else None}
             for i in mixed]
    return Chosen(kept, dropped, pool, pool_index, mixed, output, info, warnings)


def measure_fresh_rollouts(config: SelectConfig, inputs: SelectionInputs,
                           models: SelectionModels, candidates: ScoredCandidates, chosen: Chosen,
                           bar: tqdm) -> dict[str, Any]:
    """Step-0 measures on fresh rollouts (another seed) of every candidate and of the other
    prompts mixed in: all candidates, the kept, the dropped and the output."""
    bar.set_postfix_str("step-0 measures, fresh rollouts")
    rendered, others = candidates.chosen, inputs.others
    extra = [] if others is None else [chosen.pool[i] for i in chosen.mixed]
    fresh = alignment_by_prompt(replace(models.measure, seed=config.seed + 1, depths=()),
                                [*rendered, *extra], models.student, models.teacher,
                                config.k)["prompts"]
    mixed_rows = ([chosen.pool_index[i] for i in chosen.mixed] if others is None
                  else range(len(rendered), len(fresh)))
    bar.update()
    return {
        "all_candidates": subset_means(fresh, range(len(rendered))),
        "selected": subset_means(fresh, chosen.kept),
        "dropped": subset_means(fresh, chosen.dropped) if chosen.dropped else None,
        "output": subset_means(fresh, [*chosen.kept, *mixed_rows]),
    }


def run_trials(config: SelectConfig, candidates: ScoredCandidates, chosen: Chosen,
               bar: tqdm) -> tuple[dict[str, Any], list[str]]:
    """Short OPD runs on the output, the kept-only and the unselected prompts (none with
    trial_steps 0), and the entropy effect between selected and unselected; with warnings."""
    trial: dict[str, Any] = {}
    warnings: list[str] = []
    if config.trial_steps:
        rendered = candidates.chosen
        sets = {"selected": chosen.output,
                "kept_only": [rendered[i] for i in chosen.kept] if config.mix_share else None,
                "unselected": [rendered[i] for i in chosen.dropped]}
        for name, rows in sets.items():
            if rows is None:
                continue
            bar.set_postfix_str(f"trial on the {name} prompts")
            if rows:
                trial[name] = _trial(config, name, rows, Path(config.out) / "trial")
            else:
                warnings.append(f"trial: no {name} prompts (keep fraction 1), nothing to compare with")
            bar.update()
    if "selected" in trial and "unselected" in trial:
        trial["entropy_effect"] = trial["selected"]["late_mean"] - trial["unselected"]["late_mean"]
    return trial, warnings


def selection_record(config: SelectConfig, inputs: SelectionInputs,
                     candidates: ScoredCandidates, chosen: Chosen, step0: dict[str, Any],
                     trial: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """selection.json: the inputs, counts, step-0 measures, trial, warnings and every
    candidate's score and fate."""
    kept, mixed = set(chosen.kept), ({chosen.pool_index[i] for i in chosen.mixed}
                                     if inputs.others is None else set())
    return {
        "inputs": {k: v for k, v in asdict(config).items() if k != "progress"},
        "k": config.k, "rank_by": list(config.rank_by),
        "counts": {"candidates": len(inputs.records), "kept": len(chosen.kept),
                   "dropped": len(chosen.dropped), "mixed_in": len(chosen.mixed),
                   "output": len(chosen.output)},
        "use_with": USE_WITH,
        "step0": step0,
        "trial": trial or None,
        "warnings": warnings,
        "prompts": [
            {"candidate": inputs.indices[i], "text": inputs.records[i].messages[-1]["content"],
             "score": candidates.scores[i], "kept": i in kept, "mixed_in": i in mixed,
             "measures": {m: row[m] for m in (*STEP0, "advantage", "tokens")}}
            for i, row in enumerate(candidates.measures)
        ],
    }


# -- report -----------------------------------------------------------------------------------
def _markdown(selection: dict[str, Any], out: Path) -> str:
    counts, step0, inputs = selection["counts"], selection["step0"], selection["inputs"]
    lines = [
        "# Teacher-aligned prompt selection", "",
        f"Student `{inputs['student']}`, teacher `{inputs['teacher']}`, candidates `{inputs['prompts']}`.",
        f"Template: **{inputs['template']}**. Ranked by {', '.join(selection['rank_by'])} "
        f"(top-{selection['k']}, {inputs['samples_per_prompt']} student rollouts per prompt); kept "
        f"{counts['kept']} of {counts['candidates']} (fraction {inputs['keep_fraction']}), mixed in "
        f"{counts['mixed_in']} other prompts (share {inputs['mix_share']}): {counts['output']} prompts "
        "in `prompts.jsonl`.", "",
        "## Train on them", "",
        "The prompts are written already rendered; OPD must use the text as is:", "",
        "```",
        f"opd train --config {out / 'train.yaml'} --student {inputs['student']} "
        f"--teacher {inputs['teacher']} --out RUN",
        "```", "",
        "`train.yaml` sets `prompts`, `template: \"{prompt}\"` and `teacher_prompt: student` "
        "(with the student's chat template or `teacher_prompt: own` the text would be wrapped again).",
        "", "## Step-0 measures", "",
        "| prompt set | rollouts | overlap ratio | overlap share | mass s | mass t | student entropy |",
        "|---|---|---|---|---|---|---|",
    ]
    table = [("candidates, student template", "seed", step0["student_template"]),
             ("candidates, teacher template", "seed", step0["teacher_template"])]
    table += [(name.replace("_", " "), "fresh", values)
              for name, values in step0["fresh_rollouts"].items() if values]
    for name, rollouts, v in table:
        lines.append(f"| {name} | {rollouts} | {fmt(v['overlap_ratio'])} | {fmt(v['overlap_share'])} | "
                     f"{fmt(v['overlap_mass_student'])} | {fmt(v['overlap_mass_teacher'])} | "
                     f"{fmt(v['student_entropy'])} |")
    lines += ["", "The first two rows score the rollouts the ranking used; the others score fresh "
              "rollouts (another seed), so the selected prompts' gain is not their sampling luck.", ""]
    trial = selection["trial"]
    if trial:
        lines += ["## Short OPD trial: student entropy", "",
                  "| prompts | set size | first step | last step | mean of last half | change |",
                  "|---|---|---|---|---|---|"]
        for name, run in trial.items():
            if isinstance(run, dict):
                lines.append(f"| {name} | {run['prompts']} | {fmt(run['first'])} | {fmt(run['last'])} | "
                             f"{fmt(run['late_mean'])} | {fmt(run['change'])} |")
        if trial.get("entropy_effect") is not None:
            lines += ["", f"Selected minus unselected (mean of the last half of the trial): "
                      f"**{trial['entropy_effect']:+.3f}** nats. A large fall on the selected prompts "
                      "is the entropy collapse of aligned content: raise --mix-share."]
    if selection["warnings"]:
        lines += ["", "## Warnings", "", *[f"- {w}" for w in selection["warnings"]]]
    lines += ["", "![selection](selection.png)", ""]
    return "\n".join(lines)


def _figure(selection: dict[str, Any], path: Path) -> None:
    from opd.run.report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    prompts = selection["prompts"]
    span = (min(p["score"] for p in prompts), max(p["score"] for p in prompts))
    for kept, label in ((True, "kept"), (False, "dropped")):
        axes[0].hist([p["score"] for p in prompts if p["kept"] == kept], bins=20, range=span, alpha=0.6,
                     label=label)
    axes[0].set_title(f"score ({' + '.join(selection['rank_by'])})", fontsize=10)
    axes[0].legend()
    step0 = selection["step0"]
    bars = {"student\ntemplate": step0["student_template"], "teacher\ntemplate": step0["teacher_template"]}
    bars |= {name.replace("_", "\n"): v for name, v in step0["fresh_rollouts"].items() if v}
    axes[1].bar(list(bars), [v["overlap_ratio"] for v in bars.values()], color="tab:blue")
    low = min(v["overlap_ratio"] for v in bars.values())
    axes[1].set_ylim(max(0.0, low - 0.1), 1.0)
    axes[1].set_title(f"step-0 overlap ratio (top-{selection['k']})", fontsize=10)
    axes[1].tick_params(axis="x", labelsize=8)
    for name, run in (selection["trial"] or {}).items():
        if isinstance(run, dict):
            axes[2].plot(range(1, run["steps"] + 1), run["student_entropy"], marker="o", ms=3, label=name)
    axes[2].set_title("student entropy in the trial", fontsize=10)
    axes[2].set_xlabel("step")
    if selection["trial"]:
        axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def _write_outputs(selection: dict[str, Any], out: Path) -> None:
    train = {"prompts": str((out / "prompts.jsonl").resolve()), **USE_WITH}
    write_text_atomic(out / "train.yaml", yaml.safe_dump(train))
    _figure(selection, out / "selection.png")
    write_text_atomic(out / "report.md", _markdown(selection, out))
    write_text_atomic(out / "selection.json", json.dumps(selection, indent=2))
