"""The metrics record: every key of a run's metrics.jsonl, declared once, and its reading and
writing.

A run appends one JSON line per optimizer step. Each key is declared below with its meaning,
unit and when it is present; every module that writes or reads a record uses these names, and
`docs/metrics.md` is generated from the declarations (`python -m opd.metrics > docs/metrics.md`;
a test keeps the two equal). The token measures are also logged by response position, under
`by_position`, one value per position bin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opd.errors import OPDError
from opd.io import write_jsonl_atomic

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class Metric:
    """One key of the per-step record."""

    name: str
    meaning: str
    unit: str
    present: str = "every step"
    """every step, when evaluated, when an alert fires, or with a teacher."""
    by_position: bool = False
    """Also logged per response-position bin under `by_position`."""


SCHEMA: dict[str, Metric] = {}


def _declare(name: str, meaning: str, unit: str, present: str = "every step",
             by_position: bool = False) -> str:
    SCHEMA[name] = Metric(name, " ".join(meaning.split()), unit, present, by_position)
    return name


STEP = _declare("step", "Optimizer step, counted from 1.", "count")
LOSS = _declare("loss", "The step's total loss: distillation, outcome and KL-to-reference terms, "
                "aggregated over the global batch (see `loss_aggregation`).", "nats")

# The study's measures on the student's rollouts, per token, averaged over response tokens.
OVERLAP_RATIO = _declare(
    "overlap_ratio", "Share of the student's top-k (k = `measure_k`) that is also in the "
    "teacher's top-k, E_t[|I_t| / k].", "fraction", "with a teacher", by_position=True)
OVERLAP_TOKEN_ADVANTAGE = _declare(
    "overlap_token_advantage", "On the shared top-k tokens, both distributions renormalised: "
    "E_t[(1/|I_t|) Σ p̄ (log q̄ − log p̄)]. At most 0; rises to 0 as the student's confidence on "
    "shared tokens matches the teacher's. Positions with no shared token are left out.",
    "nats", "with a teacher", by_position=True)
ENTROPY_GAP = _declare(
    "entropy_gap", "E_t[|H(q_t) − H(p_t)|], full-vocabulary entropies of teacher and student.",
    "nats", "with a teacher", by_position=True)
OVERLAP_MASS_STUDENT = _declare(
    "overlap_mass_student", "Student probability on the shared top-k tokens, E_t[Σ_{v∈I_t} p_t(v)].",
    "probability", "with a teacher", by_position=True)
OVERLAP_MASS_TEACHER = _declare(
    "overlap_mass_teacher", "Teacher probability on the shared top-k tokens, E_t[Σ_{v∈I_t} q_t(v)].",
    "probability", "with a teacher", by_position=True)
STUDENT_ENTROPY = _declare(
    "student_entropy", "Student entropy H(p_t) over the whole vocabulary.", "nats",
    by_position=True)
TEACHER_ENTROPY = _declare(
    "teacher_entropy", "Teacher entropy H(q_t) over the whole vocabulary.", "nats",
    "with a teacher", by_position=True)
REVERSE_KL = _declare(
    "reverse_kl", "Sampled-token estimate of KL(p‖q): log p_t(ŷ_t) − log q_t(ŷ_t).", "nats",
    "with a teacher", by_position=True)
ALIGNED_SHARE = _declare(
    "aligned_share", "Share of response tokens at an exact position of a teacher with another "
    "tokenizer (objective cross_tokenizer_kl): one token on both sides, the same string. The "
    "teacher measures above are taken there only, on the mapped shared vocabulary.", "fraction",
    "with a teacher of another tokenizer")

TEACHER_ENTROPY_ESTIMATE = _declare(
    "teacher_entropy_estimate", "`topk` when teacher_entropy and entropy_gap are estimates: the "
    "teacher is served by a backend that sends only its top-k (vllm), and its entropy is "
    "−Σ over its top-k tokens of q log q, a lower bound. Absent when they are exact.", "text",
    "with a teacher served by the vllm backend")

ENGINE_PRESENT = "with rollout_engine vllm"
ROLLOUT_LOGPROB_GAP = _declare(
    "rollout_logprob_gap", "Mean absolute gap |log p_trainer(ŷ_t) − log p_engine(ŷ_t)| between the "
    "student's log-prob of each sampled token as the trainer computes it and as the rollout "
    "engine reported it (vLLM: numerics, dtype drift, a weight sync gone wrong).", "nats",
    ENGINE_PRESENT, by_position=True)
ROLLOUT_LOGPROB_GAP_MAX = _declare(
    "rollout_logprob_gap_max", "Largest such gap over the step's response tokens.", "nats",
    ENGINE_PRESENT)

GRAD_NORM = _declare("grad_norm", "Global gradient norm before clipping.", "norm")
RESPONSE_LENGTH = _declare("response_length", "Mean response length of the step's rollouts, "
                           "EOS included.", "tokens")
TRUNCATION_RATE = _declare("truncation_rate", "Share of rollouts that reached `max_new_tokens` "
                           "without an EOS.", "fraction")
TRAIN_REWARD = _declare("train_reward", "Mean verifier reward of the step's rollouts (null when "
                        "some prompt has no answer).", "fraction")
LR = _declare("lr", "Learning rate after the step's scheduler update.", "lr")
SKIPPED_STEPS = _declare("skipped_steps", "Steps skipped so far because the loss or gradient "
                         "was not finite.", "count")
STALENESS = _declare(
    "staleness", "Updates between the weights that sampled the step's rollouts and the weights "
    "it updates: min(step − 1, max_staleness); 0 in a synchronous run.", "updates")
METER_PRESENT = "every staleness_meter_every steps"
STALENESS_LOSS_BIAS = _declare(
    "staleness_loss_bias", "The staleness meter: the step's loss on its (stale) rollouts minus "
    "the loss on fresh rollouts of the same prompts sampled by the current weights.", "nats",
    METER_PRESENT)
STALENESS_GRAD_COSINE = _declare(
    "staleness_grad_cosine", "The staleness meter: cosine between the gradient of the stale "
    "batch and that of the fresh one (1 = same direction; null for a zero gradient).",
    "cosine", METER_PRESENT)
STALENESS_GRAD_NORM_RATIO = _declare(
    "staleness_grad_norm_ratio", "The staleness meter: norm of the stale batch's gradient over "
    "the fresh batch's, both before clipping.", "ratio", METER_PRESENT)
TIME_ROLLOUT = _declare("time_rollout", "Wall time of the student's rollouts; with "
                        "max_staleness > 0, the time the step waited for the worker that sampled "
                        "them ahead (0 when they were ready).", "seconds")
TIME_SCORE = _declare("time_score", "Wall time of the teacher's (and reference's) scoring.",
                      "seconds")
TIME_UPDATE = _declare("time_update", "Wall time of the student's forward and backward pass, "
                       "objective, measures and optimizer step.", "seconds")
TIME_EVAL = _declare("time_eval", "Wall time of the evaluation.", "seconds", "when evaluated")
ACCURACY = _declare("accuracy", "avg@n accuracy on `eval_prompts`.", "fraction", "when evaluated")
BY_POSITION = _declare("by_position", "Each token measure per response-position bin "
                       "(`position_bins` equal bins over `max_new_tokens`; null for an empty bin).",
                       "mapping")
BY_TEACHER = _declare("by_teacher", "Each token measure's mean over the prompts of each "
                      "teacher, by the teacher's name in `teachers` (runs with several "
                      "teachers).", "mapping", "with several teachers")
ALERTS = _declare("alerts", "Failure signatures the live monitor found at this step: rule, step, "
                  "evidence, likely cause and recipe.", "list", "when an alert fires")

TOKEN_MEASURES: tuple[str, ...] = tuple(
    m.name for m in SCHEMA.values() if m.by_position and m.present != ENGINE_PRESENT)
"""The study's measures computed per response token (and so also by position)."""
TEACHER_MEASURES: tuple[str, ...] = tuple(
    m.name for m in SCHEMA.values() if m.by_position and m.present == "with a teacher")
"""Token measures that need a teacher; null in a run without one (GRPO)."""


def append(run_folder: str | Path, record: dict[str, Any]) -> None:
    """Add one step's record to the run's metrics.jsonl (one write of one whole line; a write
    that fails, e.g. on a full disk, stops the run with one line, and `--resume` drops any part
    of a line it left)."""
    unknown = set(record) - set(SCHEMA)
    if unknown:
        raise KeyError(f"metrics: undeclared keys {sorted(unknown)}; declare them in opd.metrics")
    path = Path(run_folder) / METRICS_FILE
    try:
        _append_line(path, json.dumps(record) + "\n")
    except OSError as err:
        raise OPDError(f"metrics: could not append step {record.get(STEP)} to {path} "
                       f"({err.strerror or err}); free space, then run again with --resume") from None


def _append_line(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line)


def read(run_folder: str | Path) -> list[dict[str, Any]]:
    """The per-step records of a run folder (empty when it has none). A last line cut short
    by a killed process is left out; damage anywhere else is named."""
    path = Path(run_folder) / METRICS_FILE
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise OPDError(f"metrics: {path} is not UTF-8 text (at byte {err.start}); the file is "
                       "damaged") from None
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise OPDError(f"metrics: {path}:{number} is not valid JSON; the file is damaged "
                               "before its last line (remove that line to use the rest)") from None
            continue
        if not isinstance(record, dict) or not isinstance(record.get(STEP), int):
            raise OPDError(f"metrics: {path}:{number} is not a step record (an object with an "
                           "integer 'step'); the file is damaged (remove that line)")
        records.append(record)
    return records


def truncate(run_folder: str | Path, last_step: int) -> None:
    """Keep the records up to `last_step` (a run killed after its last checkpoint logged more)."""
    kept = [r for r in read(run_folder) if r.get(STEP, 0) <= last_step]
    write_jsonl_atomic(Path(run_folder) / METRICS_FILE, kept)


def markdown() -> str:
    """docs/metrics.md: the schema as a table."""
    lines = [
        "# metrics.jsonl", "",
        "One JSON object per optimizer step. Generated from `opd/metrics.py` "
        "(`python -m opd.metrics > docs/metrics.md`); the measures are explained in "
        "[method.md](method.md#measures).", "",
        "| key | meaning | unit | present | by position |", "|---|---|---|---|---|",
    ]
    for m in SCHEMA.values():
        lines.append(f"| `{m.name}` | {m.meaning} | {m.unit} | {m.present} | "
                     f"{'yes' if m.by_position else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
