"""Measure a teacher–student pair before training, on the student's own rollouts
(docs/method.md#measures, #when-opd-works, #long-horizons).

Stages, in order: the student samples `n` rollouts per prompt (as OPD would); both models
score them (the step-0 measures, overall and by position, for several k); the
teacher scores them again under its own chat template (template check); the student's
rollouts are cut at several depths and the teacher and the student each continue from the
same prefix with the same random numbers (continuation advantage by depth: novelty and
horizon); the sequence-mean reward is compared across correct and wrong rollouts (AUROC).
The result is one JSON-ready dict; `rules.decide` turns it into a verdict and `report` draws
it. The teacher sees the prompt as OPD would show it (`teacher_prompt`, as in TrainConfig).

A teacher may be served (`opd serve-teacher`, a URL): its tokenizer and chat template come from
the server, its samples from `/v1/generate`, its scores from `/v1/score` (its top-k and the
sampled tokens, which is all the measures read, so they are exact; its entropy is exact from
the hf backend and a top-k estimate from vllm, which the diagnosis says: `entropy`).

A teacher with another tokenizer (`cross_tokenizer`) is measured as objective cross_tokenizer_kl
trains from it: it re-tokenizes the student's response text after its own rendering of the prompt
(`RetokenizingTeacher`), and the pattern measures are taken where the two tokenizations align one
token to one, on the shared vocabulary; `ACROSS_TOKENIZERS` says what is exact and what is not.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from opd import metrics as M
from opd.config.choices import ENGINES
from opd.config.fields import (
    Decoding,
    Generation,
    ModelLoading,
    ModelPair,
    PromptSource,
    TeacherOptions,
    check_template,
)
from opd.config.settings import group, setting
from opd.config.training import PROFILES as TRAIN_PROFILES
from opd.data.prompts import PromptRecord, load_prompts, render_prompt, source_of
from opd.doctor.control import measure_control
from opd.doctor.forecast import forecast_for, load_fit
from opd.doctor.progress import DiagnosisShape, WorkMeter, planned_passes
from opd.doctor.rules import Thresholds, auroc, clustered_mean_se, decide, horizon
from opd.errors import OPDError
from opd.evaluation.verify import VERIFIERS, get_verifier
from opd.io import check_output_folder, check_teacher_urls, is_url
from opd.models.loading import (
    check_same_vocabulary,
    context_window,
    default_device,
    load_model,
    load_tokenizer,
    vocabulary_difference,
)
from opd.runtime import timed
from opd.step.distributions import known
from opd.step.engines import generate, model_length_limit, require_engine, vllm_engine
from opd.step.measures import (
    means_from_totals,
    position_bin_edges,
    position_totals,
    token_measures,
    topk_mass,
)
from opd.step.rollout import Rollouts, check_prompts, encode_prompts, pack
from opd.step.scoring import LocalTeacher, output_head, response_states, score, vocab_size
from opd.teachers.build import RetokenizingTeacher, TextInputs, text_decoder
from opd.teachers.client import ServedTeacher, TeacherClient, check_served_vocabulary
from opd.teachers.protocol import vocabulary_fingerprint


@dataclass(frozen=True, kw_only=True)
class DiagnoseConfig(Generation, Decoding, PromptSource, TeacherOptions, ModelLoading, ModelPair):
    """Inputs and sampling settings of one diagnosis (`opd diagnose`)."""

    prompts: str = setting("", "The prompts you plan to train on (.jsonl / .parquet, a "
                           "save_to_disk folder or a hub dataset id); an 'answer' per row enables "
                           "the accuracy checks.")
    out: str = setting("diagnosis", "Output folder of diagnosis.json, report.md and figures.")
    teacher2: str | None = setting(None, "A second teacher (folder or URL): measured the same "
                                   "way, and compared with the first.")
    teachers: dict[str, str] = setting(
        factory=dict, help="Several teachers, as in training: a value of the prompt field "
        "`teacher_field` → the teacher folder or URL for the prompts with that value; each gets its "
        "own diagnosis and verdict, in OUT/<value>. Instead of `teacher`.")
    student_template: str | None = setting(None, "Format string with {prompt} instead of the "
                                           "student tokenizer's chat template.")
    teacher_template: str | None = setting(None, "Format string with {prompt} instead of the "
                                           "teacher tokenizer's chat template.")
    teacher_prompt: str = setting("student", "How OPD will show the prompt to the teacher: the "
                                  "`student` rendering or its `own` (config teacher_prompt).",
                                  choices=("student", "own"))
    num_prompts: int = setting(64, "Prompts sampled (seeded) from the file: take them from the "
                               "set you plan to train on.", minimum=1)
    temperature: float = setting(1.0, "Rollout temperature (as in training: the states OPD "
                                 "will see).", minimum=0)
    capability_temperature: float = setting(
        0.0, "Decoding of the continuations and of the teacher's own attempts: 0 = greedy, so "
        "that a capability is what a model does at its mode, not what sampling noise lets it "
        "miss.", minimum=0)
    depths: tuple[float, ...] = setting((0.0, 0.25, 0.5, 0.75), "Cuts of each rollout for "
                                        "continuations: below 1 a share of its response, from 1 "
                                        "up a token count; increasing.", minimum=0)
    k: tuple[int, ...] = setting((1, 4, 16), "Top-k sizes of the overlap measures (the pattern "
                                 "check uses thresholds.pattern_k).", minimum=1)
    position_bins: int = setting(8, "Response-position bins of the by-position measures.",
                                 minimum=1)
    verifier: str = setting("exact", "exact, number (the last number of the response, for "
                            "models that write no answer line) or math (needs math-verify).",
                            choices=tuple(VERIFIERS))
    seed: int = setting(0, "Seed of the prompt sample, rollouts and continuations.")
    rollout_engine: str = setting(
        "hf", "What generates the rollouts, continuations and the teacher's own attempts: hf "
        "(opd's own sampler) or vllm (needs the vllm extra; one engine, on each model in turn).",
        choices=ENGINES)
    batch_size: int = setting(64, "Rollouts generated and scored at a time.", minimum=1)
    train_steps: int = setting(200, "Steps of the training run being judged (for the cost "
                               "share).", minimum=1)
    train_rollouts: int = setting(256, "Rollouts per step of that run (the study: 64 prompts × "
                                  "4).", minimum=1)
    control: bool = setting(False, "Also ask whether the teacher matters: train the student "
                            "control_steps steps with the teacher's signal and with each control "
                            "(a constant advantage; the teacher's log-probs shuffled across "
                            "positions) and report the share of the gain that needs the teacher. "
                            "It trains: three short runs.")
    control_steps: int = setting(40, "Steps of each control run.", minimum=1)
    control_profile: str = setting("cpu-small", "Training profile of the control runs (as "
                                   "`opd train --profile`).")
    thresholds: Thresholds = group(Thresholds, "What counts as enough for each check.")
    progress: bool = setting(True, "Show a progress bar.")
    cross_tokenizer: bool = setting(
        False, "Measure a teacher with another tokenizer as objective cross_tokenizer_kl trains "
        "from it: the pattern measures where the two tokenizations align one token to one, on "
        "the shared vocabulary; diagnosis.json's across_tokenizers says what is approximate.")

    def check(self) -> None:
        check_template(self.student_template, "student_template")
        if self.teachers and (self.teacher or self.teacher2):
            raise OPDError("teacher: give either teacher (and teacher2) or teachers (one teacher "
                           "per value of teacher_field), not both")
        check_teacher_urls(self.teachers, teacher=self.teacher, teacher2=self.teacher2)
        check_template(self.teacher_template, "teacher_template")
        if self.teacher2 and is_url(self.teacher):
            raise OPDError("teacher: comparing it with teacher2 needs its whole distribution, which "
                           "a served teacher does not send; give the first teacher as a model "
                           "folder (teacher2 may be a URL)")
        if self.cross_tokenizer:
            named = [("teacher", self.teacher), ("teacher2", self.teacher2),
                     *((f"teachers.{name}", path) for name, path in self.teachers.items())]
            served = [name for name, path in named if path and is_url(path)]
            if served:
                raise OPDError(f"cross_tokenizer: {served[0]} is served (a URL), and a served "
                               "teacher scores the student's token ids only; give it as a model "
                               "folder, or drop cross_tokenizer")
            if self.teacher2:
                raise OPDError("cross_tokenizer: teacher2 is compared with teacher on one "
                               "vocabulary, which teachers of other tokenizers need not share; "
                               "diagnose each teacher on its own (one opd diagnose each)")
        if self.control and self.cross_tokenizer:
            raise OPDError("control: the control runs train with the teacher's log-probs on the "
                           "student's vocabulary, which a teacher of another tokenizer does not "
                           "have; leave out --control or --cross-tokenizer")
        if self.control and is_url(self.teacher):
            raise OPDError("control: the control runs need the teacher's whole distribution, "
                           "which a served teacher does not send; give the teacher as a model "
                           "folder, or leave out --control")
        if self.control_profile not in TRAIN_PROFILES:
            raise OPDError(f"control_profile: unknown profile {self.control_profile!r}; choose "
                           f"one of {', '.join(TRAIN_PROFILES)}")
        if list(self.depths) != sorted(set(self.depths)):
            raise OPDError(f"config: depths must be increasing, e.g. 0,0.25,0.5; got "
                           f"{','.join(f'{d:g}' for d in self.depths)}")


@dataclass
class Pair:
    """A loaded model with its tokenizer and how it renders the prompts; a served teacher has
    its client and entropy kind (exact or topk) instead of a model."""

    name: str
    path: str
    model: torch.nn.Module | None
    tokenizer: Any
    prompt_rows: list[list[int]]
    served: ServedTeacher | None = None
    aligner: RetokenizingTeacher | None = None
    """A teacher with another vocabulary (`cross_tokenizer`): what scores the student's text."""
    prompt_texts: list[str] = field(default_factory=list)
    """The rendered prompts, as text (what an `aligner` re-tokenizes)."""


@dataclass
class Baseline:
    """What every teacher is measured against: the student, its rollouts and continuations."""

    config: DiagnoseConfig
    records: list[PromptRecord]
    student: Pair
    rollouts: Rollouts
    correct: list[bool] | None
    cuts: list[list[int | None]]  # [depth][rollout] cut in tokens, None = not cut there
    student_continuations: list[list[bool] | None]
    cost: dict[str, Any]
    meter: WorkMeter


def cut_at(depth: float, length: int) -> int | None:
    """Prefix length of a response of `length` tokens (its EOS excluded) at `depth`."""
    if depth < 1:
        return int(depth * length)
    return int(depth) if depth < length else None


def _sample_records(config: DiagnoseConfig, value: str | None = None) -> list[PromptRecord]:
    """The seeded sample of prompts (of those whose `teacher_field` is `value`, when given)."""
    if not config.prompts:
        raise OPDError("prompts: no prompt file given; pass --prompts FILE (the prompts you plan "
                       "to train on)")
    records = load_prompts(config.prompts, **source_of(config))
    if value is not None:
        records = [r for r in records if str(r.meta.get(config.teacher_field)) == value]
    if config.num_prompts < len(records):
        records = random.Random(config.seed).sample(records, config.num_prompts)
    return records


def load_pair(path: str, role: str, config: DiagnoseConfig, student: Pair | None = None) -> Pair:
    """A model and its tokenizer, no prompts rendered yet; a teacher's vocabulary is checked
    against the `student`'s first (OPDError on a mismatch). A teacher's URL gives a served
    teacher (its tokenizer from the server)."""
    if is_url(path) and student is not None:
        return _served_pair(path, role, config, student)
    tokenizer = load_tokenizer(path, role, config.trust_remote_code)
    across = (student is not None and config.cross_tokenizer
              and vocabulary_difference(student.tokenizer, tokenizer) is not None)
    if student is not None and not across:
        check_same_vocabulary(student.tokenizer, tokenizer, student.path, path,
                              across="diagnose across tokenizers with --cross-tokenizer")
    model = load_model(path, role, trainable=False, dtype=config.dtype, device=default_device(),
                       trust_remote_code=config.trust_remote_code)
    aligner = (RetokenizingTeacher(model, tokenizer, student.tokenizer, 1.0,
                                   vocab_size(student.model)) if across else None)
    return Pair(role, path, model, tokenizer, [], aligner=aligner)


def _served_pair(url: str, role: str, config: DiagnoseConfig, student: Pair) -> Pair:
    """The teacher served at `url`, asked for its top-k at the largest k measured (no
    candidates: every measure reads only each side's own top-k and the sampled token)."""
    client = TeacherClient(url, timeout=config.teacher_timeout)
    info = client.info()
    vocab_size = int(student.model.get_output_embeddings().weight.shape[0])
    check_served_vocabulary(info, vocabulary_fingerprint(student.tokenizer), vocab_size, url)
    tokenizer = client.tokenizer(role, config.trust_remote_code)
    check_same_vocabulary(student.tokenizer, tokenizer, student.path, url)
    k = min(max([*config.k, config.thresholds.pattern_k]), vocab_size, info["limits"]["max_k"])
    teacher = ServedTeacher(client, vocab_size=vocab_size, k=k, candidates_k=0, temperature=1.0,
                            entropy=info.get("entropy", "exact"))
    return Pair(role, url, None, tokenizer, [], served=teacher)


def _render(pair: Pair, records: Sequence[PromptRecord], template: str | None) -> Pair:
    """`pair` with its prompt rows for `records` (chat template, or the format string); a
    prompt it cannot render, or longer than its context window, is refused first."""
    check_prompts(records, pair.tokenizer, template, who=f"the {pair.name}'s rendering",
                  limit=context_window(pair.path), limit_name=f"the {pair.name}'s context window",
                  fix="shorten or remove the row")
    texts = [render_prompt(r.messages, pair.tokenizer, template) for r in records]
    return replace(pair, prompt_rows=encode_prompts(pair.tokenizer, texts), prompt_texts=texts)


def _decode_correct(tokenizer: Any, records: Sequence[PromptRecord], verifier: str,
                    responses: Sequence[list[int]], prompt_index: Sequence[int]) -> list[bool]:
    check = get_verifier(verifier)
    texts = tokenizer.batch_decode(list(responses), skip_special_tokens=True)
    return [bool(check(t, records[i].answer)) for t, i in zip(texts, prompt_index, strict=True)]


def _generate(pair: Pair, config: DiagnoseConfig, prompts: Sequence[str] | Sequence[list[int]],
              meter: WorkMeter, **options: Any) -> Rollouts:
    """`pair`'s samples from the configured engine (vLLM: the process's engine, on `pair`'s
    folder, long enough for a continuation: prompt, prefix and new tokens), counted on
    `meter` as every row's whole budget of decode steps."""
    engine = None if pair.served is None else pair.served.client
    if engine is None and config.rollout_engine == "vllm":
        longest = max(len(row) for row in pair.prompt_rows) + config.max_new_tokens
        engine = vllm_engine(pair.path, dtype=next(pair.model.parameters()).dtype,
                             max_model_len=model_length_limit(context_window(pair.path), longest,
                                                              config.max_new_tokens),
                             settings=config.vllm, trust_remote_code=config.trust_remote_code)
    start = meter.bar.n
    out = generate(engine, pair.model, pair.tokenizer, prompts, on_step=meter.decoded, **options)
    budget = len(prompts) * options.get("n", 1) * options["max_new_tokens"]
    meter.advance(budget - (meter.bar.n - start))  # rows that stopped early, or another engine
    return out


def _continuation_steps(config: DiagnoseConfig, rollouts: Rollouts,
                        cuts: list[list[int | None]]) -> int:
    """Decode row-steps of one model's continuations at every depth (as `_continue` runs them)."""
    steps = 0
    for depth_cuts in cuts:
        prefixes = [c for c in depth_cuts if c is not None]
        if prefixes:
            steps += len(prefixes) * max(config.max_new_tokens - min(prefixes), 1)
    return steps


def _body_length(ids: list[int], eos: int) -> int:
    return len(ids) - 1 if ids and ids[-1] == eos else len(ids)


def _continue(pair: Pair, ctx: Baseline, depth_index: int) -> tuple[list[bool], int]:
    """Correctness of `pair` continuing every cut rollout at one depth, and tokens generated.
    Seeds depend only on (rollout, depth), so every model draws the same random numbers."""
    config, rollouts = ctx.config, ctx.rollouts
    rows = [j for j, c in enumerate(ctx.cuts[depth_index]) if c is not None]
    if not rows:
        return [], 0
    prefixes = [rollouts.response_ids[j][: ctx.cuts[depth_index][j]] for j in rows]
    if pair.aligner is not None:  # the prefix's text in the teacher's own tokens
        decode = text_decoder(ctx.student.tokenizer)
        prefixes = pair.tokenizer([decode(p) for p in prefixes],
                                  add_special_tokens=False)["input_ids"]
    index = rollouts.prompt_index.tolist()
    inputs = [pair.prompt_rows[index[j]] + p for j, p in zip(rows, prefixes, strict=True)]
    budget = _new_tokens(pair, ctx) - min(len(p) for p in prefixes)
    out = _generate(
        pair, config, inputs, ctx.meter, n=1, max_new_tokens=max(budget, 1),
        temperature=config.capability_temperature, top_p=config.top_p, seed=config.seed + 1,
        prompt_ids=[j * len(config.depths) + depth_index for j in rows],
        batch_size=config.batch_size,
    )
    full = [p + r for p, r in zip(prefixes, out.response_ids, strict=True)]
    correct = _decode_correct(pair.tokenizer, ctx.records, config.verifier, full,
                              [index[j] for j in rows])
    return correct, sum(len(r) for r in out.response_ids)


def _new_tokens(pair: Pair, ctx: Baseline) -> int:
    """`max_new_tokens` in `pair`'s own tokens: for a teacher with another tokenizer, scaled by
    how many of its tokens the student's responses take per student token (a character-level
    teacher writes several per word), never fewer."""
    limit = ctx.config.max_new_tokens
    if pair.aligner is None:
        return limit
    decode = text_decoder(ctx.student.tokenizer)
    texts = [decode(ids) for ids in ctx.rollouts.response_ids]
    own = sum(len(ids) for ids in pair.tokenizer(texts, add_special_tokens=False)["input_ids"])
    student = sum(len(ids) for ids in ctx.rollouts.response_ids)
    return max(limit, -(-limit * own // max(student, 1)))


def _teacher_inputs(pair: Pair, ctx: Baseline, rows: slice):
    """The teacher's rows for scoring: its prompt rendering around the student's responses."""
    index = ctx.rollouts.prompt_index[rows].tolist()
    return pack([pair.prompt_rows[i] for i in index], ctx.rollouts.response_ids[rows],
                pair.tokenizer.pad_token_id)


def _text_inputs(pair: Pair, ctx: Baseline, rows: slice) -> TextInputs:
    """What a teacher with another vocabulary scores: its prompt texts and the student's
    responses, which it re-tokenizes."""
    index = ctx.rollouts.prompt_index[rows].tolist()
    return TextInputs([pair.prompt_texts[i] for i in index], ctx.rollouts.response_ids[rows],
                      (~ctx.rollouts.truncated[rows]).tolist())


ACROSS_TOKENIZERS = {
    "student": "exact: the student's rollouts, accuracy and continuations are its own",
    "pattern": "approximate: every measure but reverse_kl is taken at the aligned positions "
               "only (aligned_share of the student's tokens: one token on each side, of texts "
               "the vocabulary map pairs), on the shared vocabulary (each side's top-k among "
               "the paired tokens); at the other positions it is not taken",
    "reverse_kl": "approximate: at a position that does not align, the sampled token's share "
                  "of its span's teacher log-prob",
    "global_signal": "approximate: the sequence reward is the mean of reverse_kl",
    "continuation": "approximate: the teacher continues its own re-tokenization of the "
                    "student's prefix (the same text, not the same tokens or random numbers), "
                    "max_new_tokens scaled by its tokens per student token on the rollouts; "
                    "novelty and horizon read it",
    "accuracy_own_template": "exact: the teacher's own attempts, with its own tokenizer",
    "template": "not applicable: across tokenizers OPD shows the teacher its own rendering of "
                "the prompt",
}
"""For a teacher with another tokenizer: which parts of its diagnosis are exact, which are
approximate and why (diagnosis.json: teacher.across_tokenizers.measures)."""

SHARES = ("overlap_share_student", "overlap_share_teacher")
"""Per token, the share of each model's own top-k probability that sits on tokens both rank in
their top-k: the overlap mass divided by the model's top-k mass, so 1 for a model
against itself whatever its entropy."""


def _measures_at(ks: Sequence[int]):
    """The measures consumer of the scoring pass: every token measure and both overlap shares
    for each k, named `measure@k`. Across tokenizers (`aligned` given) the student's top-k mass
    is taken among the tokens the teacher's vocabulary pairs, as its top-k in `token_measures`."""
    def measure(student_lp: torch.Tensor, teacher_lp: torch.Tensor, targets: torch.Tensor,
                teacher_entropy: torch.Tensor | None = None, aligned: torch.Tensor | None = None):
        values = {}
        student_side = (student_lp if aligned is None
                        else student_lp.masked_fill(~known(teacher_lp), -torch.inf))
        for k in ks:
            at_k = token_measures(student_lp, teacher_lp, targets, k, teacher_entropy, aligned)
            share_student, share_teacher = SHARES
            at_k[share_student] = at_k[M.OVERLAP_MASS_STUDENT] / topk_mass(student_side, k)
            at_k[share_teacher] = at_k[M.OVERLAP_MASS_TEACHER] / topk_mass(teacher_lp, k)
            values.update({f"{name}@{k}": value for name, value in at_k.items()})
        return values

    return measure


@torch.no_grad()
def _score(left: Pair, right: Pair, ctx: Baseline, k: Sequence[int]) -> dict[str, Any]:
    """Per-token measures of `right` against `left` (left plays the student; right may be
    served) on the student's rollouts, for each k: a dict k → {measure: [M] tensor} (the token
    measures and SHARES), plus positions and rows. Rows are scored `batch_size` at a time, in
    one pass for all k."""
    rollouts, size = ctx.rollouts, ctx.config.batch_size
    left_head = output_head(left.model)
    right_head = None if right.served else output_head(right.model)
    columns: dict[str, list[torch.Tensor]] = {}
    positions, rows = [], []
    for start in range(0, rollouts.input_ids.shape[0], size):
        part = slice(start, start + size)
        left_states = response_states(left.model, *_teacher_inputs(left, ctx, part))
        if right.aligner is not None:
            teacher = right.aligner.logprobs(_text_inputs(right, ctx, part), None, left_head)
        elif right.served:
            teacher = right.served.logprobs(_teacher_inputs(right, ctx, part), left_states,
                                            left_head)
        else:
            teacher = LocalTeacher(response_states(right.model, *_teacher_inputs(right, ctx, part)),
                                   right_head)
        scores = score(left_states, teacher, student_head=left_head, measures=_measures_at(k))
        for name, value in scores.measures.items():
            columns.setdefault(name, []).append(value.cpu())
        ctx.meter.advance(2 * left_states.positions.numel())
        positions.append(left_states.positions.cpu())
        rows.append(left_states.rows.cpu() + start)
    ctx.cost["scored_tokens"] += 2 * int(sum(p.numel() for p in positions))
    by_k: dict[int, dict[str, torch.Tensor]] = {kk: {} for kk in k}
    for key, parts in columns.items():
        name, kk = key.rsplit("@", 1)
        by_k[int(kk)][name] = torch.cat(parts)
    return {"measures": by_k, "positions": torch.cat(positions), "rows": torch.cat(rows)}


def _row_means(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> list[float]:
    """The mean of `values` in each of `n_rows` rows, NaN entries left out (a measure not
    taken there, as `position_totals`)."""
    taken = ~values.isnan()
    sums = torch.zeros(n_rows, dtype=torch.float64).index_add_(
        0, rows, torch.where(taken, values.double(), 0.0))
    counts = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, rows, taken.double())
    return (sums / counts.clamp(min=1)).tolist()


def _pattern(scored: dict[str, Any], ctx: Baseline) -> dict[str, Any]:
    """Overall and by-position means of every measure, for each k."""
    max_len = int(ctx.rollouts.response_lengths.max())
    edges = position_bin_edges(max(max_len, 1), ctx.config.position_bins)
    out: dict[str, Any] = {"bin_edges": edges, "by_k": {}}
    for k, values in scored["measures"].items():
        sums, counts = position_totals(values, scored["positions"], edges)
        overall, by_position = means_from_totals(list(values), sums, counts)
        out["by_k"][str(k)] = {"overall": overall, "by_position": by_position}
    return out


def _template_check(teacher: Pair, ctx: Baseline) -> dict[str, Any]:
    """The teacher's log-prob of the student's responses under its own template (`teacher`'s
    prompt rows) minus under the student's rendering: a mean over each rollout's tokens, then
    mean and prompt-clustered SE over rollouts. It applies when OPD shows the teacher the
    student's rendering (teacher_prompt student)."""
    if teacher.aligner is not None:
        return {"identical": False, "applies": False, "gap": None, "se": None,
                "note": ACROSS_TOKENIZERS["template"]}
    asked = _as_student_rendering(teacher, ctx)
    applies = ctx.config.teacher_prompt == "student"
    if teacher.prompt_rows == asked.prompt_rows:
        return {"identical": True, "applies": False, "gap": 0.0, "se": 0.0,
                "note": "the teacher's template renders the prompts exactly as the student's"}
    if teacher.served:  # log p_own(ŷ) − log p_asked(ŷ) from the server's token log-probs
        everything = slice(None)
        gap_tokens, rows = (teacher.served.token_logprobs(_teacher_inputs(teacher, ctx, everything))
                            - teacher.served.token_logprobs(_teacher_inputs(asked, ctx, everything)),
                            _response_rows(ctx))
        ctx.cost["scored_tokens"] += 2 * gap_tokens.numel()
        ctx.meter.advance(2 * gap_tokens.numel())
    else:
        k = ctx.config.thresholds.pattern_k
        scored = _score(teacher, asked, ctx, [k])
        gap_tokens = scored["measures"][k][M.REVERSE_KL]  # log p_own(ŷ) − log p_asked(ŷ)
        rows = scored["rows"]
    per_row = _row_means(gap_tokens, rows, ctx.rollouts.input_ids.shape[0])
    stats = clustered_mean_se(per_row, ctx.rollouts.prompt_index.tolist())
    decode = teacher.tokenizer.decode
    return {"identical": False, "applies": applies, "gap": stats["mean"], "se": stats["se"],
            "example_own": decode(teacher.prompt_rows[0]), "example_student": decode(asked.prompt_rows[0])}


def _response_rows(ctx: Baseline) -> torch.Tensor:
    """The rollout row of each response token, row-major (as `ResponseStates.rows`)."""
    lengths = torch.tensor([len(r) for r in ctx.rollouts.response_ids])
    return torch.arange(len(lengths)).repeat_interleave(lengths)


def _as_student_rendering(teacher: Pair, ctx: Baseline) -> Pair:
    return replace(teacher, prompt_rows=ctx.student.prompt_rows)


def _asked(teacher: Pair, ctx: Baseline) -> Pair:
    """The teacher with the prompt as OPD will show it: its own rendering under teacher_prompt
    own, and always across tokenizers (as cross_tokenizer_kl trains); else the student's."""
    own = ctx.config.teacher_prompt == "own" or teacher.aligner is not None
    return teacher if own else _as_student_rendering(teacher, ctx)


def _continuation_curve(pair: Pair, ctx: Baseline) -> tuple[list[dict[str, Any]], list[list[bool]]]:
    """Per depth: accuracies and the paired advantage (all prompts; prompts the student never
    solved), with prompt-clustered standard errors."""
    index = ctx.rollouts.prompt_index.tolist()
    solved = _solved(ctx)
    eos = ctx.student.tokenizer.eos_token_id
    lengths = [_body_length(r, eos) for r in ctx.rollouts.response_ids]
    curve, teacher_correct = [], []
    for d, depth in enumerate(ctx.config.depths):
        correct, generated = _continue(pair, ctx, d)
        ctx.cost["continuations"] += len(correct)
        ctx.cost["generated_tokens"] += generated
        rows = [j for j, c in enumerate(ctx.cuts[d]) if c is not None]
        student = ctx.student_continuations[d]
        diffs = [float(t) - float(s) for t, s in zip(correct, student, strict=True)]
        clusters = [index[j] for j in rows]
        hard = [i for i, c in enumerate(clusters) if c not in solved]
        cuts = sorted(ctx.cuts[d][j] for j in rows)
        fractions = sorted(ctx.cuts[d][j] / max(lengths[j], 1) for j in rows)
        curve.append({
            "depth": depth,
            "tokens": cuts[len(cuts) // 2] if rows else None,
            "fraction": fractions[len(fractions) // 2] if rows else None,
            "rollouts": len(rows),
            "teacher_accuracy": sum(correct) / len(correct) if rows else None,
            "student_accuracy": sum(student) / len(student) if rows else None,
            "advantage": clustered_mean_se(diffs, clusters),
            "advantage_unsolved": clustered_mean_se([diffs[i] for i in hard], [clusters[i] for i in hard]),
        })
        teacher_correct.append(correct)
    return curve, teacher_correct


def _solved(ctx: Baseline) -> set[int]:
    """Prompts the student solved at least once: in a rollout or continuing from the prompt
    (the shallowest cut). The others are what the student cannot do."""
    index = ctx.rollouts.prompt_index.tolist()
    solved = {i for i, ok in zip(index, ctx.correct or [], strict=True) if ok}
    rows = [j for j, c in enumerate(ctx.cuts[0]) if c is not None]
    return solved | {index[j] for j, ok in zip(rows, ctx.student_continuations[0], strict=True) if ok}


def _accuracy_own(pair: Pair, ctx: Baseline) -> float:
    """The teacher's accuracy from scratch on the prompts, with its own template."""
    config = ctx.config
    texts = [render_prompt(r.messages, pair.tokenizer, config.teacher_template) for r in ctx.records]
    out = _generate(pair, config, texts, ctx.meter, n=config.samples_per_prompt,
                            max_new_tokens=_new_tokens(pair, ctx),
                            temperature=config.capability_temperature,
                            top_p=config.top_p, seed=config.seed + 2, batch_size=config.batch_size)
    ctx.cost["teacher_rollouts"] += len(out.response_ids)
    ctx.cost["generated_tokens"] += int(out.response_lengths.sum())
    correct = _decode_correct(pair.tokenizer, ctx.records, config.verifier, out.response_ids,
                              out.prompt_index.tolist())
    return sum(correct) / len(correct)


def measure_teacher(teacher: Pair, ctx: Baseline, times: dict[str, float]) -> dict[str, Any]:
    """Everything about one teacher on the student's states, with its verdict."""
    config, t = ctx.config, ctx.config.thresholds
    asked = _asked(teacher, ctx)
    out: dict[str, Any] = {"path": teacher.path,
                           "entropy": teacher.served.entropy if teacher.served else "exact"}
    with timed(f"{teacher.name}_scoring", times):
        ctx.meter.stage(f"{teacher.name}: step-0 measures")
        scored = _score(ctx.student, asked, ctx, sorted({*config.k, t.pattern_k}))
        out["pattern"] = _pattern(scored, ctx)
        reward = [-v for v in _row_means(scored["measures"][t.pattern_k][M.REVERSE_KL], scored["rows"],
                                         ctx.rollouts.input_ids.shape[0])]
        ctx.meter.stage(f"{teacher.name}: template check")
        out["template"] = _template_check(teacher, ctx)
    out["sequence_reward"] = reward
    out["global_signal"] = None
    out["continuation"], out["horizon"] = None, None
    novelty = advantage = fraction = None
    if ctx.correct is not None:
        out["global_signal"] = {"auroc": auroc(reward, ctx.correct)}
        with timed(f"{teacher.name}_continuations", times):
            ctx.meter.stage(f"{teacher.name}: continuations")
            out["accuracy_own_template"] = _accuracy_own(teacher, ctx)
            curve, correct = _continuation_curve(asked, ctx)
        out["continuation"], out["continuation_correct"] = curve, correct
        out["horizon"] = horizon(curve, t.z)
        novelty, advantage = curve[0]["advantage_unsolved"], curve[0]["advantage"]
        if novelty["n"] == 0:
            novelty = {"mean": None, "se": None}
        fraction = out["horizon"]["fraction"] if out["horizon"] else None
        out["recommended_max_new_tokens"] = _recommended_length(out["horizon"])
    shares = out["pattern"]["by_k"][str(t.pattern_k)]["overall"]
    out["across_tokenizers"] = _across_tokenizers(teacher, shares)
    out["summary"] = {
        "overlap_share": min(shares["overlap_share_student"], shares["overlap_share_teacher"]),
        "novelty": novelty, "advantage": advantage, "horizon_fraction": fraction,
        "template": out["template"], "across_tokenizers": teacher.aligner is not None,
    }
    out["decision"] = decide(out["summary"], t).as_dict()
    return out


def _across_tokenizers(teacher: Pair, overall: dict[str, Any]) -> dict[str, Any] | None:
    """For a teacher with another tokenizer: the share of the student's tokens at aligned
    positions, the size of the shared vocabulary and `ACROSS_TOKENIZERS`; None otherwise. With
    no aligned position there is no pattern to judge: an OPDError says so."""
    if teacher.aligner is None:
        return None
    vocab_map = teacher.aligner.vocab_map
    shared, size = int((vocab_map >= 0).sum()), int(vocab_map.numel())
    if overall[SHARES[0]] is None:
        raise OPDError(f"cross_tokenizer: no token of the student's rollouts aligns one to one "
                       f"with a token of {teacher.path}'s re-tokenization on their shared "
                       f"vocabulary ({shared} of the student's {size} tokens have a "
                       "counterpart), so the pattern check has nothing to read; a longer "
                       "--max-new-tokens helps when every rollout is cut, else this pair can be "
                       "judged only by training (objective cross_tokenizer_kl)")
    return {"aligned_share": overall[M.ALIGNED_SHARE], "shared_vocabulary": shared,
            "student_vocabulary": size, "measures": ACROSS_TOKENIZERS}


def _recommended_length(point: dict[str, Any] | None) -> int | None:
    """The horizon in tokens, rounded up to a multiple of 8; None when there is no horizon
    within the measured depths or no advantage even from the prompt (nothing to cap)."""
    if point is None or not point["tokens"]:
        return None
    return max(8, -(-int(point["tokens"]) // 8) * 8)


def _distinguishable(first: dict[str, Any], second: dict[str, Any], pair_scored: dict[str, Any],
                     ctx: Baseline) -> dict[str, Any]:
    """Whether two teachers differ from the student's states: top-k agreement between them and
    their continuation accuracies from the same prefixes."""
    t = ctx.config.thresholds
    values = pair_scored["measures"][t.pattern_k]
    mass = min(float(values["overlap_share_student"].mean()),
               float(values["overlap_share_teacher"].mean()))
    out: dict[str, Any] = {"overlap_share": mass, M.OVERLAP_RATIO: float(values[M.OVERLAP_RATIO].mean()),
                           M.REVERSE_KL: float(values[M.REVERSE_KL].mean()), "by_depth": []}
    differs = mass < t.min_overlap_share
    if first.get("continuation_correct") and second.get("continuation_correct"):
        index = ctx.rollouts.prompt_index.tolist()
        for d, (a, b) in enumerate(zip(first["continuation_correct"], second["continuation_correct"],
                                       strict=True)):
            rows = [j for j, c in enumerate(ctx.cuts[d]) if c is not None]
            stats = clustered_mean_se([float(x) - float(y) for x, y in zip(a, b, strict=True)],
                                      [index[j] for j in rows])
            out["by_depth"].append({"depth": ctx.config.depths[d], **stats})
            differs |= abs(stats["mean"]) > t.z * stats["se"]
    out["distinguishable"] = differs
    return out


def _student_baseline(config: DiagnoseConfig, records: Sequence[PromptRecord], student: Pair,
                      meter: WorkMeter, shape: DiagnosisShape) -> Baseline:
    """The student's rollouts of its prompt rows; with an answer on every record, their
    correctness and the student's own continuations at every depth. `meter` is replanned
    from what the rollouts turned out to be (`shape`: the diagnosis being run)."""
    cost = {"student_rollouts": 0, "teacher_rollouts": 0, "continuations": 0,
            "generated_tokens": 0, "scored_tokens": 0}
    rollouts = _generate(
        student, config, student.prompt_rows, meter, n=config.samples_per_prompt,
        max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        top_p=config.top_p, seed=config.seed, batch_size=config.batch_size,
    )
    cost["student_rollouts"] = len(rollouts.response_ids)
    cost["generated_tokens"] += int(rollouts.response_lengths.sum())
    eos = student.tokenizer.eos_token_id
    cuts = [[cut_at(d, _body_length(r, eos)) for r in rollouts.response_ids] for d in config.depths]
    ctx = Baseline(config, list(records), student, rollouts, None, cuts, [], cost, meter)
    full = shape.rollouts * shape.max_new_tokens
    meter.replan(planned_passes(shape, int(rollouts.response_lengths.sum()),
                                _continuation_steps(config, rollouts, cuts)) - full)
    if all(r.answer is not None for r in records):
        ctx.correct = _decode_correct(student.tokenizer, records, config.verifier,
                                      rollouts.response_ids, rollouts.prompt_index.tolist())
        for d in range(len(config.depths)):
            correct, generated = _continue(student, ctx, d)
            ctx.student_continuations.append(correct)
            cost["continuations"] += len(correct)
            cost["generated_tokens"] += generated
    return ctx


def alignment_by_prompt(config: DiagnoseConfig, records: Sequence[PromptRecord], student: Pair,
                        teacher: Pair, k: int) -> dict[str, Any]:
    """The step-0 measures at top-`k` per prompt, on the student's `config.samples_per_prompt`
    rollouts of each of `records` (rendered with the config's templates; the teacher sees them
    as `config.teacher_prompt` says). Per prompt: `tokens` scored, a token mean of every
    measure, `overlap_share` (the min of both sides, as in the diagnosis) and, with
    answers and `config.depths`, `advantage`: the teacher's minus the student's accuracy
    continuing from the first depth (else None). `overall`: token means over all prompts."""
    student = _render(student, records, config.student_template)
    teacher = _render(teacher, records, config.teacher_template)
    shape = _shape(config, records, student, [teacher])
    ctx = _student_baseline(config, records, student, WorkMeter(0, enabled=False), shape)
    asked = _asked(teacher, ctx)
    scored = _score(student, asked, ctx, [k])
    values = scored["measures"][k]
    token_prompt = ctx.rollouts.prompt_index[scored["rows"]]
    tokens = torch.bincount(token_prompt, minlength=len(records)).tolist()
    means = {m: _row_means(v, token_prompt, len(records)) for m, v in values.items()}
    prompts = [{"tokens": n, **{m: means[m][i] for m in means}, "advantage": None}
               for i, n in enumerate(tokens)]
    for row in prompts:
        row["overlap_share"] = min(row["overlap_share_student"], row["overlap_share_teacher"])
    if ctx.correct is not None and config.depths:
        _, teacher_correct = _continuation_curve(asked, ctx)
        index = ctx.rollouts.prompt_index.tolist()
        rows = [j for j, c in enumerate(ctx.cuts[0]) if c is not None]
        diffs = [float(t) - float(s) for t, s in
                 zip(teacher_correct[0], ctx.student_continuations[0], strict=True)]
        prompt_of_row = torch.tensor([index[j] for j in rows], dtype=torch.long)
        advantage = _row_means(torch.tensor(diffs), prompt_of_row, len(records))
        counts = torch.bincount(prompt_of_row, minlength=len(records)).tolist()
        for row, value, n in zip(prompts, advantage, counts, strict=True):
            row["advantage"] = value if n else None
    overall = {m: float(v.mean()) for m, v in values.items()}
    overall["overlap_share"] = min(overall["overlap_share_student"], overall["overlap_share_teacher"])
    return {"k": k, "overall": overall, "prompts": prompts, "cost": ctx.cost}


def run_diagnosis(config: DiagnoseConfig, *, writes: bool = True,
                  value: str | None = None) -> dict[str, Any]:
    """Measure the pair (and a second teacher) and return the diagnosis as a JSON-ready dict,
    on the prompts whose `teacher_field` is `value` when given. Every input is checked first:
    with `writes`, also the output folder `config.out` the caller will write the diagnosis to."""
    start = time.perf_counter()
    times: dict[str, float] = {}
    get_verifier(config.verifier)
    require_engine(config.rollout_engine)
    if writes:
        check_output_folder(config.out, "out")
    records = _sample_records(config, value)
    meter = WorkMeter(0, enabled=config.progress)
    with timed("load", times):
        meter.stage("loading models")
        student = _render(load_pair(config.student, "student", config), records, config.student_template)
        paths = [("teacher", config.teacher), *([("teacher2", config.teacher2)] if config.teacher2 else [])]
        teachers = [_render(load_pair(path, role, config, student), records, config.teacher_template)
                    for role, path in paths]
    shape = _shape(config, records, student, teachers)
    meter.replan(planned_passes(shape))
    warnings: list[str] = []
    if any(r.answer is None for r in records):
        missing = sum(r.answer is None for r in records)
        warnings.append(f"prompts: {missing} of {len(records)} sampled prompts have no 'answer'; "
                        "accuracy, novelty, horizon and AUROC are skipped (pattern and template "
                        "checks still run)")
    with timed("student_rollouts", times):
        meter.stage("student rollouts")
        ctx = _student_baseline(config, records, student, meter, shape)
    results = [measure_teacher(teacher, ctx, times) for teacher in teachers]
    across = results[0]["across_tokenizers"]
    if across is not None:
        warnings.append(
            f"teacher: another tokenizer; the pattern measures read only the "
            f"{across['aligned_share']:.0%} of the student's tokens that align one to one, on "
            f"the shared vocabulary ({across['shared_vocabulary']} of the student's "
            f"{across['student_vocabulary']} tokens have a counterpart); "
            "teacher.across_tokenizers says what is approximate")
    fit = load_fit()
    for result in results:
        result["forecast"] = forecast_for(result["decision"]["checks"], fit,
                                          {"steps": config.train_steps})
    diagnosis: dict[str, Any] = {
        "verdict": results[0]["decision"]["verdict"],
        "inputs": {k: v for k, v in asdict(config).items() if k not in {"thresholds", "progress"}},
        "thresholds": asdict(config.thresholds),
        "student": _student_summary(ctx),
        "teacher": results[0],
        "forecast": results[0]["forecast"],
        "teacher2": None,
        "warnings": warnings + results[0]["decision"]["warnings"],
    }
    if len(results) > 1:
        with timed("teacher_vs_teacher2", times):
            scored = _score(_as_student_rendering(teachers[0], ctx),
                            _as_student_rendering(teachers[1], ctx), ctx, [config.thresholds.pattern_k])
        results[1]["versus_teacher"] = _distinguishable(results[0], results[1], scored, ctx)
        diagnosis["teacher2"] = results[1]
    for result in results:
        result.pop("continuation_correct", None)
    meter.close()
    if config.control:
        with timed("control", times):
            diagnosis["control"] = _control(config, records)
    diagnosis["cost"] = _cost(ctx, times, time.perf_counter() - start)
    diagnosis["cost"]["estimated_seconds"] = (None if meter.estimate_seconds is None
                                              else round(meter.estimate_seconds, 2))
    diagnosis["cost"]["planned_token_passes"] = meter.bar.total
    return diagnosis


def student_accuracy(path: str, records: Sequence[PromptRecord], config: DiagnoseConfig) -> float:
    """Greedy accuracy of the student folder `path` on `records`, rendered as the student
    sees them."""
    from opd.evaluation.accuracy import evaluate

    model = load_model(path, "student", trainable=False, dtype=config.dtype,
                       trust_remote_code=config.trust_remote_code)
    tokenizer = load_tokenizer(path, "student", config.trust_remote_code)
    return evaluate(model, tokenizer, records, max_new_tokens=config.max_new_tokens,
                    verifier=config.verifier, template=config.student_template,
                    seed=config.seed).accuracy


def _control(config: DiagnoseConfig, records: Sequence[PromptRecord]) -> dict[str, Any]:
    """Does the teacher matter (`--control`): the short runs on `config.prompts`, judged on
    the diagnosis's prompts `records`."""
    base = {"student": config.student, "teacher": config.teacher, "prompts": config.prompts,
            "max_steps": config.control_steps, "max_new_tokens": config.max_new_tokens,
            "seed": config.seed, "template": config.student_template,
            "teacher_prompt": config.teacher_prompt, "dtype": config.dtype,
            "trust_remote_code": config.trust_remote_code}
    found = measure_control(base, config.control_profile,
                            lambda path: student_accuracy(path, records, config))
    return {"prompts": len(records), **found}


def _shape(config: DiagnoseConfig, records: Sequence[PromptRecord], student: Pair,
           teachers: Sequence[Pair]) -> DiagnosisShape:
    return DiagnosisShape(
        rollouts=len(records) * config.samples_per_prompt, max_new_tokens=config.max_new_tokens,
        depths=len(config.depths), teachers=len(teachers),
        answers=all(r.answer is not None for r in records),
        template_checks=sum(t.aligner is None and t.prompt_rows != student.prompt_rows
                            for t in teachers),
        teacher_pairs=int(len(teachers) > 1))


def _student_summary(ctx: Baseline) -> dict[str, Any]:
    rollouts = ctx.rollouts
    out = {"path": ctx.student.path, "prompts": len(ctx.records), "rollouts": len(rollouts.response_ids),
           "mean_response_length": float(rollouts.response_lengths.float().mean()),
           "truncation_rate": float(rollouts.truncated.float().mean()),
           "accuracy": None, "unsolved_prompts": None, "correct": ctx.correct}
    if ctx.correct is not None:
        out["accuracy"] = sum(ctx.correct) / len(ctx.correct)
        out["unsolved_prompts"] = len(ctx.records) - len(_solved(ctx))
    return out


def _cost(ctx: Baseline, times: dict[str, float], wall: float) -> dict[str, Any]:
    """What the diagnosis cost and its share of the training run it judges, in token passes:
    a training step generates R rollouts of mean length L, scores them with the teacher and runs
    the student forward and backward (≈ 3 passes): ≈ 5·R·L token passes per step."""
    config, cost = ctx.config, dict(ctx.cost)
    length = float(ctx.rollouts.response_lengths.float().mean())
    spent = cost["generated_tokens"] + cost["scored_tokens"]
    run = 5 * config.train_steps * config.train_rollouts * max(length, 1.0)
    cost.update({
        "wall_seconds": round(wall, 2),
        "stage_seconds": {k.removeprefix("time_"): round(v, 2) for k, v in times.items()},
        "token_passes": spent,
        "training_run": {"steps": config.train_steps, "rollouts_per_step": config.train_rollouts,
                         "token_passes_estimate": round(run)},
        "percent_of_training_run": round(100 * spent / run, 2),
    })
    return cost
