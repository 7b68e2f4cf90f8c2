"""The settings of a training run (`opd train`, `opd grpo`, `opd cold-start`): one frozen
dataclass with groups, filled from defaults < profile < YAML < flags < --set.

`opd train --help-config` lists every setting; the method behind them is in docs/method.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opd.config.choices import (
    AGGREGATIONS,
    CANDIDATE_SETS,
    CONTROL_NONE,
    CONTROLS,
    CROSS_TOKENIZER,
    ENGINES,
    FORWARD_KL_OBJECTIVES,
    MIXED_PRECISION,
    OBJECTIVES,
    ON_FAILURE,
    PARALLEL,
    SCHEDULES,
    SERVED_OBJECTIVES,
    STALE_LOSSES,
    TEACHER_PARALLEL,
    TRACKERS,
    VERIFIERS,
    WEIGHTINGS,
)
from opd.config.fields import (
    Decoding,
    Generation,
    ModelLoading,
    ModelPair,
    PromptSource,
    TeacherOptions,
    VLLMConfig,
    check_template,
)
from opd.config.settings import Config, build, group, setting
from opd.errors import OPDError
from opd.io import check_teacher_urls, is_url


def check_served_teacher(objective: str, teacher_prompt: str) -> None:
    """Refuse, at the start, what a served teacher cannot do."""
    if objective == CROSS_TOKENIZER:
        raise OPDError("objective.name: cross_tokenizer_kl re-tokenizes the student's text with "
                       "the teacher's tokenizer in this process; a served teacher with another "
                       "tokenizer is not supported yet: give the teacher as a folder")
    if objective not in SERVED_OBJECTIVES:
        raise OPDError(f"objective.name: {objective} needs the teacher's whole distribution, "
                       "which a served teacher does not send; use one of "
                       f"{', '.join(SERVED_OBJECTIVES)}, or a teacher folder")
    if teacher_prompt != "student":
        raise OPDError("teacher_prompt: `own` needs the teacher's tokenizer in this process; "
                       "with a served teacher use teacher_prompt student")


@dataclass(frozen=True)
class ObjectiveConfig(Config):
    """Which per-token distillation objective, and its knobs (docs/method.md#objectives)."""

    name: str = setting("topk", "Per-token objective: sampled, topk, subset_kl, "
                        "full_reverse_kl, forward_kl, jsd, or cross_tokenizer_kl (a teacher "
                        "with another tokenizer).", choices=OBJECTIVES)
    k: int = setting(16, "Candidate-set size of topk and subset_kl.", minimum=1)
    strategy: str = setting("student", "Candidate set of topk and subset_kl: student, teacher, "
                            "intersection, union or symmetric-difference.",
                            choices=CANDIDATE_SETS)
    weighting: str = setting("student_p", "Candidate weights of topk: student_p, teacher_p or "
                             "none.", choices=WEIGHTINGS)
    beta: float = setting(0.5, "β of jsd: 0 = forward KL(teacher‖student), 1 = reverse "
                          "KL(student‖teacher).", minimum=0, maximum=1)
    teacher_temperature: float = setting(1.0, "Temperature applied to the teacher's logits "
                                         "before its log-softmax.", above=0)
    sorted_weight: float = setting(
        0.0, "cross_tokenizer_kl: weight of ULD's sorted-probability distance (Boizard et al. "
        "2024) at the first token of each span that does not align, where both models predict "
        "the text after the same characters: Σ_r |p_(r) − q_(r)| over the ranks r of each "
        "side's probabilities. 0 = off.", minimum=0)
    control: str = setting("none", "Replace the teacher's signal by a control, to measure how "
                           "much of a run's gain depends on the teacher: none (real OPD), "
                           "constant (every token gets the mean sampled-token reward as its "
                           "advantage) or shuffled (the teacher's log-probs permuted across "
                           "positions).", choices=CONTROLS)

    def check(self) -> None:
        if self.sorted_weight and self.name != CROSS_TOKENIZER:
            raise OPDError(f"objective.sorted_weight: a term of cross_tokenizer_kl only (the "
                           f"objective is {self.name}); set objective.name cross_tokenizer_kl or "
                           "objective.sorted_weight 0")
        if self.control != CONTROL_NONE and self.name == CROSS_TOKENIZER:
            raise OPDError("objective.control: the controls need the teacher's log-probs on the "
                           "student's vocabulary; set objective.control=none with "
                           "cross_tokenizer_kl")


@dataclass(frozen=True, kw_only=True)
class ColdStartConfig(Decoding):
    """The off-policy cold start's teacher data and fine-tuning (`opd cold-start`, and the
    monitor's `on_failure: cold-start`); its OPD stage uses the run's own settings."""

    prompts: str | None = setting(None, "Prompts the teacher answers (default: the run's "
                                  "prompts).")
    samples_per_prompt: int = setting(4, "Teacher samples per prompt per attempt.", minimum=1)
    max_attempts: int = setting(3, "Attempts per prompt until one verified-correct response "
                                "is found (when answers are known).", minimum=1)
    temperature: float = setting(0.7, "Teacher sampling temperature.", minimum=0)
    top_p: float = setting(0.95, "Teacher nucleus threshold.", above=0, maximum=1)
    keep: str = setting("auto", "Which responses to keep: auto (verified-correct when every "
                        "prompt has an answer, else all), correct or all.",
                        choices=("auto", "correct", "all"))
    sft_steps: int = setting(1000, "Most fine-tuning steps: a cap, since the fine-tuning stops "
                             "once the validation loss stops improving (sft_patience).",
                             minimum=1)
    sft_lr: float = setting(1e-4, "Fine-tuning peak learning rate (linear warm-up over a tenth "
                            "of the cap, at most 20 steps, then cosine decay over the cap).",
                            above=0)
    sft_batch_size: int = setting(32, "Fine-tuning examples per step.", minimum=1)
    sft_validation_share: float = setting(
        0.1, "Share of the prompts held out (with their teacher responses) to measure the "
        "validation loss, and on which the gate measures accuracy.", above=0, maximum=0.5)
    sft_eval_every: int = setting(25, "Fine-tuning steps between two validation losses.",
                                  minimum=1)
    sft_patience: int = setting(4, "Validation losses in a row without a 1% improvement after "
                                "which the fine-tuning stops (the best weights are kept).",
                                minimum=1)
    min_prompts: int = setting(256, "Fewest distinct prompts with a kept teacher response below "
                               "which the cold start warns that the student may learn the "
                               "answers by heart instead of the pattern.", minimum=1)
    gate_prompts: int = setting(64, "Held-out prompts on which the gate before OPD measures the "
                                "fine-tuned student against the teacher.", minimum=1)
    sft_dropout: bool = setting(True, "Keep the student's own dropout during the fine-tuning "
                                "(off: switched off, as in the on-policy stage).")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Generation, Decoding, PromptSource, TeacherOptions, ModelLoading, ModelPair):
    """Everything one OPD / GRPO / hybrid run needs. Defaults follow the study."""

    student: str = setting("", "Local Hugging Face folder (or hub id) of the student; it is "
                           "trained.")
    teacher: str = setting("", "Folder or hub id of the teacher; frozen. Not needed when "
                           "distill_weight is 0 (GRPO). A URL (http://host:port) scores with "
                           "a teacher served by `opd serve-teacher`.")
    samples_per_prompt: int = setting(4, "Student samples per prompt (the GRPO group).",
                                      minimum=1)
    max_new_tokens: int = setting(7168, "Response length cap; a response hitting it counts as "
                                  "truncated.", minimum=1)
    seed: int = setting(0, "Seed for data order, rollouts and initialisation.")
    rollout_engine: str = setting(
        "hf", "What samples the student's rollouts: hf (opd's own sampler in transformers: exact "
        "and deterministic) or vllm (a vLLM engine in the training process, given the new weights "
        "after every step; needs the vllm extra).", choices=ENGINES)
    vllm: VLLMConfig = group(VLLMConfig, "The colocated vLLM engine (rollout_engine: vllm).")
    out: str = setting("runs/opd", "Run folder: metrics.jsonl, checkpoints/, config.yaml, "
                       "reports.")
    max_steps: int = setting(100, "Optimizer steps to run.", minimum=1)
    prompts_per_step: int = setting(64, "Prompts per step, across all processes.", minimum=1)
    max_prompt_tokens: int = setting(1024, "Prompt length cap; a longer prompt is refused up "
                                     "front with its row named, never cut.", minimum=1)
    tis_cap: float = setting(
        0.0, "Truncated importance sampling against the rollout engine: each token's loss is "
        "weighted by min(p_trainer / p_engine, tis_cap) (rollout_engine: vllm, or stale rollouts "
        "with stale_loss tis; 0 = off).", minimum=0)
    max_staleness: int = setting(
        0, "Rollouts ahead of the update: 0 = synchronous (sample, score, update, sample again); "
        "S > 0 = a worker thread with its own copy of the student samples the next steps' "
        "rollouts while this step updates, step t's with the weights after update t-1-S (so "
        "the staleness is min(t-1, S), whatever the timing). rollout_engine hf, one process; "
        "costs up to S+1 extra copies of the student's weights.", minimum=0)
    stale_loss: str = setting(
        "auto", "How the loss treats a stale rollout: recompute (the student's side scored "
        "under the current weights, the tokens taken as its own samples), tis (that, each "
        "token's loss also weighted by min(p_now / p_sampler, tis_cap)), or auto: recompute "
        "for the reverse-KL objectives, tis for forward_kl (whose target, the teacher's, "
        "tolerates stale states).",
        choices=STALE_LOSSES)
    staleness_meter_every: int = setting(
        0, "Every this many steps, also sample the step's prompts with the current weights and "
        "log what the stale batch changed: the loss's bias and the gradient's cosine and norm "
        "ratio to the fresh batch's (0 = off; one more sampling and backward on those steps).",
        minimum=0)
    template: str | None = setting(None, "Python format string with {prompt} used instead of "
                                   "the student tokenizer's chat template.")
    chat_template_kwargs: dict[str, Any] = setting(
        factory=dict, help="Extra variables for the chat template, e.g. {enable_thinking: "
        "false} for Qwen3's thinking switch; used wherever a prompt is rendered (rollouts, the "
        "teacher's own rendering, evaluation, the cold start).")
    teacher_prompt: str = setting(
        "student", "How the teacher sees the prompt: `student` (the student's rendering, "
        "token-identical) or `own` (re-rendered with the teacher tokenizer's chat template).",
        choices=("student", "own"))
    objective: ObjectiveConfig = group(ObjectiveConfig, "The per-token distillation objective.")
    loss_aggregation: str = setting("token-mean", "token-mean or sequence-mean over the global "
                                    "batch.", choices=AGGREGATIONS)
    distill_weight: float = setting(1.0, "Weight of the distillation term; 0 with "
                                    "outcome_weight > 0 is GRPO.", minimum=0)
    outcome_weight: float = setting(0.0, "λ of the group-normalised outcome advantage (needs "
                                    "answers and a verifier).", minimum=0)
    kl_penalty: float = setting(0.0, "Coefficient of a k3 KL-to-reference (the initial student) "
                                "penalty; 0 = off.", minimum=0)
    verifier: str = setting("exact", "exact, number (the last number of the response, for "
                            "models that write no answer line) or math (needs math-verify).",
                            choices=VERIFIERS)
    lr: float = setting(1e-6, "AdamW learning rate.", above=0)
    lr_schedule: str = setting("constant", "constant, linear or cosine decay after warm-up.",
                               choices=SCHEDULES)
    warmup_steps: int = setting(0, "Linear warm-up steps.", minimum=0)
    weight_decay: float = setting(0.0, "AdamW weight decay.", minimum=0)
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this value (0 = no "
                               "clipping).", minimum=0)
    measure_k: int = setting(16, "k of the overlap measures.", minimum=1)
    position_bins: int = setting(8, "Response-position bins for the by-position measures.",
                                 minimum=1)
    chunk_size: int = setting(0, "Positions per chunk when computing logits, objective and "
                              "measures (0 = from the vocabulary: as many as keep a chunk "
                              "within 2^23 logits, at least 256).", minimum=0)
    micro_batch: int = setting(0, "Rollouts per forward/backward pass (0 = all of a process's "
                               "rollouts at once).", minimum=0)
    eval_prompts: str | None = setting(None, "Prompt set with answers evaluated every "
                                       "eval_every steps (and at the start and end); the same "
                                       "columns as prompts.")
    eval_split: str | None = setting(None, "Split of eval_prompts when it is a dataset.")
    eval_every: int = setting(0, "Evaluate every this many steps (0 = only at start and end "
                              "when eval_prompts is set).", minimum=0)
    eval_samples_per_prompt: int = setting(1, "Samples per evaluation prompt (avg@n).",
                                           minimum=1)
    eval_temperature: float = setting(0.7, "Evaluation sampling temperature (0 = greedy).",
                                      minimum=0)
    eval_top_p: float = setting(0.95, "Evaluation nucleus threshold.", above=0, maximum=1)
    save_every: int = setting(50, "Checkpoint every this many steps (and at the end).",
                              minimum=1)
    keep_checkpoints: int = setting(2, "Most recent checkpoints kept.", minimum=1)
    lora_rank: int = setting(0, "Train LoRA adapters of this rank instead of all weights "
                             "(needs peft); 0 = full.", minimum=0)
    disable_dropout: bool = setting(
        True, "Switch off the student's dropout (and layer drop, router jitter) while it is "
        "trained, so the policy scored and updated is the one that sampled the rollouts; "
        "teacher and reference always run in eval mode. Saved checkpoints keep the model's "
        "own dropout settings.")
    parallel: str = setting(
        "ddp", "How several processes (accelerate launch) share the student: ddp (a whole copy "
        "each, gradients all-reduced) or fsdp (FSDP2: parameters, gradients and AdamW state "
        "sharded). Without a distributed launch neither applies.", choices=PARALLEL)
    teacher_parallel: str = setting(
        "replicate", "How several processes hold the teacher: replicate (a whole copy each) or "
        "fsdp (sharded, forward only).", choices=TEACHER_PARALLEL)
    mixed_precision: str = setting(
        "no", "bf16: the student's forward and backward in bfloat16 over float32 master weights, "
        "gradients reduced in float32 (FSDP2; needs a distributed launch, even of one "
        "process, and dtype float32; for GPUs).",
        choices=MIXED_PRECISION)
    activation_checkpointing: bool = setting(
        False, "Recompute each decoder layer of the student in backward instead of keeping its "
        "activations (less memory, one more forward).")
    on_failure: str = setting(
        "warn", "What the live monitor does when a run shows a failure signature: warn, stop, "
        "or cold-start (stop, then run the off-policy cold start into OUT/cold-start).",
        choices=ON_FAILURE)
    cold_start: ColdStartConfig = group(ColdStartConfig, "The off-policy cold start "
                                        "(`opd cold-start`, on_failure: cold-start).")
    progress: bool = setting(True, "Show a progress bar.")
    report_to: tuple[str, ...] = setting(
        (), "Experiment trackers fed with every step's measures, the alerts, the config and the "
        "report's figures (any of them; each is an extra: pip install \"opd[tensorboard]\").",
        choices=TRACKERS)
    project: str = setting("opd", "Project (W&B, trackio) or experiment (MLflow) the run is "
                           "logged under.")
    run_name: str | None = setting(None, "The run's name in the trackers (default: the name of "
                                   "the out folder).")

    def check(self) -> None:
        check_template(self.template, "template")
        if self.teachers and self.teacher:
            raise OPDError("teacher: give either teacher or teachers (one teacher per value of "
                           "teacher_field), not both")
        check_teacher_urls(self.teachers, teacher=self.teacher)
        if self.distill_weight and any(is_url(t) for t in (self.teacher, *self.teachers.values())):
            check_served_teacher(self.objective.name, self.teacher_prompt)
            if self.objective.control != CONTROL_NONE:
                raise OPDError("objective.control: a served teacher sends only some entries, "
                               "which a control would move to positions they do not belong "
                               "to; give the teacher as a model folder, or objective.control="
                               "none")
        if self.distill_weight == 0 and self.outcome_weight == 0:
            raise OPDError("config: distill_weight and outcome_weight are both 0; nothing to learn")
        if self.tis_cap and self.rollout_engine == "hf" and not self.max_staleness:
            raise OPDError("config: tis_cap needs rollout_engine=vllm or max_staleness > 0 "
                           "(opd's own sampler's log-probs are the trainer's); set tis_cap=0 "
                           "or rollout_engine=vllm")
        if self.max_staleness and self.rollout_engine != "hf":
            raise OPDError("max_staleness: rollouts ahead of the update need rollout_engine=hf "
                           "(the vllm engine samples in step); set max_staleness=0 or "
                           "rollout_engine=hf")
        if self.max_staleness and stale_loss_of(self) == "tis" and not self.tis_cap:
            raise OPDError(f"stale_loss: tis (the default for {self.objective.name}) weights "
                           "each stale token by min(p_now / p_sampler, tis_cap); set tis_cap "
                           "(e.g. 2) or stale_loss=recompute")
        if self.mixed_precision == "bf16" and self.dtype != "float32":
            raise OPDError("mixed_precision: bf16 keeps float32 master weights; set dtype=float32 "
                           "(or mixed_precision=no)")
        if self.outcome_weight and self.samples_per_prompt < 2:
            raise OPDError("config: outcome_weight needs samples_per_prompt ≥ 2 (a group "
                           "baseline)")


def stale_loss_of(config: TrainConfig) -> str:
    """`stale_loss` resolved: auto is tis for objectives whose expectation is under the teacher
    (forward KL tolerates stale rollouts), recompute for the reverse-KL ones, which do not."""
    if config.stale_loss != "auto":
        return config.stale_loss
    return "tis" if config.objective.name in FORWARD_KL_OBJECTIVES else "recompute"


PROFILES: dict[str, dict[str, Any]] = {
    "study": {},
    "cpu-small": {
        "prompts_per_step": 16,
        "samples_per_prompt": 4,
        "max_new_tokens": 96,
        "max_prompt_tokens": 64,
        "lr": 1e-4,
        "warmup_steps": 10,
        "lr_schedule": "cosine",
        "objective": {"k": 8},
        "measure_k": 8,
        "save_every": 25,
        "eval_every": 25,
        "eval_temperature": 0.0,
        "cold_start": {"sft_lr": 1e-3, "sft_batch_size": 64},
    },
}
"""Defaults profiles (`--profile`); the first is the default."""


def build_config(*layers: dict[str, Any], profile: str = "study") -> TrainConfig:
    """A TrainConfig from layers of values over a profile (later layers win)."""
    if profile not in PROFILES:
        raise OPDError(f"profile: unknown value {profile!r}; choose one of {sorted(PROFILES)}")
    return build(TrainConfig, PROFILES[profile], *layers)
