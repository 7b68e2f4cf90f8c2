"""Run configuration: one frozen dataclass, filled from defaults < profile < YAML < flags.

Every field has a docstring; `--set key=value` reaches any field, and a bad value is an
OPDError that names the field and what it accepts.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from opd.errors import OPDError
from opd.monitor import ON_FAILURE
from opd.objectives import AGGREGATIONS, ObjectiveConfig, validate_objective


@dataclass(frozen=True)
class TrainConfig:
    """Everything one OPD / GRPO / hybrid run needs. Defaults follow the study (SPEC §2)."""

    student: str = ""
    """Local Hugging Face folder (or hub id) of the student; it is trained."""
    teacher: str = ""
    """Folder or hub id of the teacher; frozen. Optional when distill_weight is 0 (GRPO)."""
    prompts: str = ""
    """Prompt file (.jsonl / .parquet) with a `prompt` text or chat `messages` per row."""
    out: str = "runs/opd"
    """Run folder: metrics.jsonl, checkpoints/, config.yaml, reports."""
    max_steps: int = 100
    """Optimizer steps to run."""
    prompts_per_step: int = 64
    """Prompts per step, across all processes."""
    rollouts_per_prompt: int = 4
    """Student samples per prompt (the GRPO group)."""
    max_new_tokens: int = 7168
    """Response length cap; a response hitting it counts as truncated."""
    max_prompt_tokens: int = 1024
    """Longer prompts keep their last tokens."""
    temperature: float = 1.0
    """Rollout sampling temperature."""
    top_p: float = 1.0
    """Rollout nucleus threshold."""
    template: str | None = None
    """Python format string with {prompt} used instead of the student tokenizer's chat template."""
    teacher_prompt: str = "student"
    """How the teacher sees the prompt: `student` (the student's rendering, token-identical)
    or `own` (re-rendered with the teacher tokenizer's chat template)."""
    objective: str = "topk"
    """sampled, topk, subset_kl, full_reverse_kl, forward_kl or jsd."""
    topk: int = 16
    """Candidate-set size k for topk / subset_kl."""
    topk_strategy: str = "student"
    """student, teacher, intersection, union or symmetric-difference."""
    topk_weighting: str = "student_p"
    """student_p, teacher_p or none."""
    jsd_beta: float = 0.5
    """β of the generalised JSD objective."""
    teacher_temperature: float = 1.0
    """Temperature applied to the teacher's logits before its log-softmax."""
    loss_aggregation: str = "token-mean"
    """token-mean or sequence-mean over the global batch."""
    distill_weight: float = 1.0
    """Weight of the distillation term; 0 with outcome_weight > 0 is GRPO."""
    outcome_weight: float = 0.0
    """λ of the group-normalised outcome advantage (needs answers and a verifier)."""
    kl_penalty: float = 0.0
    """Coefficient of a k3 KL-to-reference (the initial student) penalty; 0 = off."""
    verifier: str = "exact"
    """exact or math (needs math-verify)."""
    lr: float = 1e-6
    """AdamW learning rate."""
    lr_schedule: str = "constant"
    """constant, linear or cosine decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    measure_k: int = 16
    """k of the overlap measures."""
    position_bins: int = 8
    """Response-position bins for the by-position measures."""
    chunk_size: int = 256
    """Positions per chunk when computing logits, objective and measures."""
    micro_batch: int = 0
    """Rollouts per forward/backward pass (0 = all of a process's rollouts at once)."""
    eval_prompts: str | None = None
    """Prompt file with answers evaluated every eval_every steps (and at the start and end)."""
    eval_every: int = 0
    """Evaluate every this many steps (0 = only at start and end when eval_prompts is set)."""
    eval_n: int = 1
    """Samples per evaluation prompt (avg@n)."""
    eval_temperature: float = 0.7
    """Evaluation sampling temperature (0 = greedy)."""
    eval_top_p: float = 0.95
    """Evaluation nucleus threshold."""
    save_every: int = 50
    """Checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept."""
    seed: int = 0
    """Seed for data order, rollouts and initialisation."""
    trust_remote_code: bool = False
    """Allow model code from the model folder (off unless asked)."""
    dtype: str = "auto"
    """Model dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16."""
    lora_rank: int = 0
    """Train LoRA adapters of this rank instead of all weights (needs peft); 0 = full."""
    on_failure: str = "warn"
    """What the live monitor does when a run shows a failure signature: warn, stop, or
    cold-start (stop, then run the off-policy cold-start recipe into OUT/cold-start)."""
    progress: bool = True
    """Show a progress bar."""

    def objective_config(self) -> ObjectiveConfig:
        return ObjectiveConfig(
            name=self.objective, k=self.topk, strategy=self.topk_strategy,
            weighting=self.topk_weighting, beta=self.jsd_beta,
        )


PROFILES: dict[str, dict[str, Any]] = {
    "study": {},
    "cpu-small": {
        "prompts_per_step": 16,
        "rollouts_per_prompt": 4,
        "max_new_tokens": 96,
        "max_prompt_tokens": 64,
        "lr": 1e-4,
        "warmup_steps": 10,
        "lr_schedule": "cosine",
        "topk": 8,
        "measure_k": 8,
        "save_every": 25,
        "eval_every": 25,
        "eval_temperature": 0.0,
    },
}

FIELD_NAMES = {f.name for f in fields(TrainConfig)}


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(underlying type, optional?) of a field annotation such as `str | None`."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return hint, False


def coerce(name: str, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or explain what is wrong."""
    if name not in FIELD_NAMES:
        close = [f for f in sorted(FIELD_NAMES) if f.startswith(name[:3])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise OPDError(f"config: unknown key {name!r}{hint}; see `opd train --help-config`")
    kind, optional = _base_type(next(f.type for f in fields(TrainConfig) if f.name == name))
    if value is None or (optional and isinstance(value, str) and value.lower() in {"none", "null"}):
        if optional:
            return None
        raise OPDError(f"config: {name} cannot be empty; give a {kind.__name__}")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            lowered = str(value).lower()
            if lowered in {"true", "1", "yes", "on"}:
                return True
            if lowered in {"false", "0", "no", "off"}:
                return False
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise OPDError(
            f"config: {name} must be a {kind.__name__}, got {value!r}"
        ) from None


def parse_set(items: list[str]) -> dict[str, Any]:
    """`key=value` strings from --set, with YAML value syntax."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise OPDError(f"--set: {item!r} is not key=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw else ""
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise OPDError(f"--config: file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise OPDError(f"--config: {path} must hold a mapping of key: value")
    return data


def build_config(*layers: dict[str, Any], profile: str = "study") -> TrainConfig:
    """Merge the layers (later wins) over the profile's defaults and validate the result."""
    if profile not in PROFILES:
        raise OPDError(f"profile: unknown value {profile!r}; choose one of {sorted(PROFILES)}")
    merged: dict[str, Any] = dict(PROFILES[profile])
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    config = TrainConfig(**{k: coerce(k, v) for k, v in merged.items()})
    validate(config)
    return config


POSITIVE = (
    "max_steps", "prompts_per_step", "rollouts_per_prompt", "max_new_tokens",
    "max_prompt_tokens", "measure_k", "position_bins", "chunk_size", "eval_n", "save_every",
    "keep_checkpoints",
)
CHOICES = {
    "loss_aggregation": AGGREGATIONS,
    "lr_schedule": ("constant", "linear", "cosine"),
    "teacher_prompt": ("student", "own"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "on_failure": ON_FAILURE,
}


def validate(config: TrainConfig) -> None:
    """Raise OPDError for the first value that cannot work, naming the field and the fix."""
    for name in POSITIVE:
        if getattr(config, name) < 1:
            raise OPDError(f"config: {name} must be at least 1, got {getattr(config, name)}")
    for name, options in CHOICES.items():
        if getattr(config, name) not in options:
            raise OPDError(
                f"config: {name} must be one of {list(options)}, got {getattr(config, name)!r}"
            )
    for name in ("lr", "temperature", "teacher_temperature"):
        if getattr(config, name) < 0 or (name != "temperature" and getattr(config, name) == 0):
            raise OPDError(f"config: {name} must be positive, got {getattr(config, name)}")
    if not 0 < config.top_p <= 1:
        raise OPDError(f"config: top_p must lie in (0, 1], got {config.top_p}")
    if config.distill_weight == 0 and config.outcome_weight == 0:
        raise OPDError("config: distill_weight and outcome_weight are both 0; nothing to learn")
    if config.outcome_weight and config.rollouts_per_prompt < 2:
        raise OPDError("config: outcome_weight needs rollouts_per_prompt ≥ 2 (a group baseline)")
    validate_objective(config.objective_config())


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def describe_fields() -> str:
    """`name (type, default): doc` for every field, for --help-config."""
    import ast
    import inspect

    source = inspect.getsource(TrainConfig)
    docs: dict[str, str] = {}
    body = ast.parse(source).body[0].body
    for node, following in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    lines = []
    for f in fields(TrainConfig):
        lines.append(f"  {f.name} = {f.default!r}\n      {docs.get(f.name, '')}")
    return "\n".join(lines)
