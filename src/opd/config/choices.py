"""The names a setting may take, declared once: the config reads them here, and the modules
that implement each name key their tables on the same tuple (tests/test_settings.py checks
that every name has an implementation)."""

ENGINES = ("hf", "vllm")
"""What samples rollouts (`rollout_engine`): opd's own sampler, or a colocated vLLM engine."""
OBJECTIVES = ("sampled", "topk", "subset_kl", "full_reverse_kl", "forward_kl", "jsd",
              "cross_tokenizer_kl")
"""Per-token distillation objectives (`objective.name`)."""
CROSS_TOKENIZER = "cross_tokenizer_kl"
"""The objective that takes a teacher with another vocabulary."""
CANDIDATE_SETS = ("student", "teacher", "intersection", "union", "symmetric-difference")
"""Candidate sets of the top-k objectives (`objective.strategy`)."""
WEIGHTINGS = ("student_p", "teacher_p", "none")
"""Candidate weights of `topk` (`objective.weighting`)."""
CONTROL_NONE, CONTROL_CONSTANT, CONTROL_SHUFFLED = "none", "constant", "shuffled"
CONTROLS = (CONTROL_NONE, CONTROL_CONSTANT, CONTROL_SHUFFLED)
"""What replaces the teacher's signal (`objective.control`): nothing (real OPD), a constant
advantage, or the teacher's log-probs shuffled across positions (opd.step.objectives)."""
AGGREGATIONS = ("token-mean", "sequence-mean")
"""How per-token losses become the step's loss (`aggregation`)."""
SCHEDULES = ("constant", "linear", "cosine")
"""Learning-rate schedules after the warm-up (`lr_schedule`)."""
ON_FAILURE = ("warn", "stop", "cold-start")
"""What the monitor does on a failure signature (`on_failure`)."""
VERIFIERS = ("exact", "number", "math")
"""Answer verifiers (`verifier`)."""
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
"""Experiment trackers a run can report to (`report_to`), each an optional extra."""
PARALLEL = ("ddp", "fsdp")
"""How a distributed launch spreads the student (`parallel`; see opd.run.parallel)."""
TEACHER_PARALLEL = ("replicate", "fsdp")
"""How it holds the teacher (`teacher_parallel`): a whole copy per process, or sharded."""
MIXED_PRECISION = ("no", "bf16")
"""Mixed precision of the student's forward and backward (`mixed_precision`)."""
DTYPES = ("auto", "float32", "bfloat16", "float16")
"""Model dtypes (`dtype`): auto picks float32 on a CPU, bfloat16 on a GPU."""
STALE_LOSSES = ("auto", "recompute", "tis")
"""How the loss treats rollouts sampled by older weights (`stale_loss`, with max_staleness > 0)."""
FORWARD_KL_OBJECTIVES = ("forward_kl",)
"""Objectives whose expectation is under the teacher: they tolerate stale rollouts, and
`stale_loss: auto` reweights them (tis) rather than taking them as the current policy's."""
SERVED_OBJECTIVES = ("sampled", "topk", "subset_kl")
"""Objectives that read only the teacher entries a served teacher sends (the sampled token, its
top-k, the student's candidates); the others need its whole distribution."""
