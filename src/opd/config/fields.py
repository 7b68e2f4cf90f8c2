"""Groups of settings that several verbs share, declared once: a verb's config takes a group by
inheriting it, and may redeclare a field to give it its own default or help (the field keeps
its place). A dataclass lists its bases' fields from the last base to the first, so a config
names its groups in reverse of the order in which `--help-config` shows them.

Also the check of a prompt format string, which several verbs apply to their templates.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd.config.choices import DTYPES, ENGINES
from opd.config.settings import Config, group, setting
from opd.errors import OPDError, one_line


@dataclass(frozen=True)
class VLLMConfig(Config):
    """The vLLM engine of `rollout_engine: vllm` (colocated with training in `opd train`)."""

    memory_share: float = setting(
        0.3, "Share of the GPU's memory the engine may take for its weights and KV cache (vLLM's "
        "gpu_memory_utilization; the trainer uses the rest). On vLLM's CPU build it is the share "
        "of RAM and the KV cache size comes from VLLM_CPU_KVCACHE_SPACE (GiB).", above=0, maximum=1)
    sleep: bool = setting(
        True, "On a GPU, put the engine to sleep (weights moved to host memory, KV cache freed) "
        "while the student is scored and updated; it wakes for the next rollouts. Ignored on a CPU.")
    enforce_eager: bool = setting(
        False, "Run the engine without CUDA graphs: a faster start and less memory, slower "
        "generation.")


@dataclass(frozen=True, kw_only=True)
class ModelPair(Config):
    """The student and the teacher (`opd train`, `opd diagnose`, `opd select-prompts`)."""

    student: str = setting("", "Student model folder (or hub id).")
    teacher: str = setting("", "Teacher model folder (or hub id), or the URL of `opd "
                           "serve-teacher` (http://host:port).")


@dataclass(frozen=True, kw_only=True)
class OneModel(Config):
    """The one model a verb works on (`opd eval`, `opd serve-teacher`)."""

    model: str = setting("", "Model folder (or hub id).")


@dataclass(frozen=True, kw_only=True)
class TeacherOptions(Config):
    """One teacher per value of a prompt field, and how long a served teacher may stay away."""

    teachers: dict[str, str] = setting(
        factory=dict, help="Several teachers: a value of the prompt field `teacher_field` → the "
        "teacher folder or URL for the prompts with that value, e.g. {math: ./t1, code: "
        "http://host:8000}; instead of `teacher`.")
    teacher_field: str = setting("source", "Prompt field whose value picks the teacher of each "
                                 "prompt (with `teachers`).")
    teacher_timeout: float = setting(60.0, "Seconds a served teacher may stay unreachable "
                                     "(retried with backoff) before opd stops (a training run "
                                     "keeps its last checkpoint).", above=0)


@dataclass(frozen=True, kw_only=True)
class PromptSource(Config):
    """Where the prompts come from, and which columns hold what (`opd.data.prompts`)."""

    prompts: str = setting("", "Prompt file (.jsonl / .parquet), folder written by save_to_disk "
                           "or hub dataset id, with a `prompt` text or chat `messages` per row.")
    split: str | None = setting(None, "Split of a dataset folder (save_to_disk) or hub dataset "
                                "(default: train, or its only split).")
    prompt_field: str = setting("prompt", "Column of the prompt text (or verl-style message "
                                "list).")
    messages_field: str = setting("messages", "Column of the chat messages (read before "
                                  "prompt_field when a row has both).")
    answer_field: str = setting("answer", "Column of the reference answer (dotted for a nested "
                                "one, e.g. reward_model.ground_truth).")


@dataclass(frozen=True, kw_only=True)
class Generation(Config):
    """How responses are generated: how many per prompt, their length cap, seed and engine."""

    samples_per_prompt: int = setting(4, "Student samples (rollouts) per prompt.", minimum=1)
    max_new_tokens: int = setting(256, "Response length cap.", minimum=1)
    seed: int = setting(0, "Seed of the samples.")
    rollout_engine: str = setting("hf", "What generates the responses: hf (opd's own sampler) or "
                                  "vllm (needs the vllm extra).", choices=ENGINES)
    vllm: VLLMConfig = group(VLLMConfig, "The vLLM engine (rollout_engine: vllm).")


@dataclass(frozen=True, kw_only=True)
class Decoding(Config):
    """The sampling distribution: temperature and nucleus threshold."""

    temperature: float = setting(1.0, "Sampling temperature (0 = greedy).", minimum=0)
    top_p: float = setting(1.0, "Nucleus threshold.", above=0, maximum=1)


@dataclass(frozen=True, kw_only=True)
class ModelLoading(Config):
    """How model folders are loaded."""

    dtype: str = setting("auto", "Model dtype: auto (float32 on CPU, bfloat16 on GPU), "
                         "float32, bfloat16 or float16.", choices=DTYPES)
    trust_remote_code: bool = setting(False, "Allow model code from the model folders (off "
                                      "unless asked).")


def check_template(template: str | None, path: str) -> None:
    """A prompt format string must hold `{prompt}` and nothing else in braces."""
    if template is None:
        return
    try:
        filled = template.format(prompt="\x00")
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise OPDError(f"config: {path} must be a format string whose only field is {{prompt}} "
                       f"(double other braces: {{{{ }}}}); {template!r} fails "
                       f"({one_line(err, 60)})") from None
    if "\x00" not in filled:
        raise OPDError(f"config: {path} must contain {{prompt}}, got {template!r}")
