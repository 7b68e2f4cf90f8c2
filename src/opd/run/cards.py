"""Model cards: the README.md of every checkpoint folder and of a run's final model folder, in
the Hugging Face model-card format (YAML front matter, then markdown).

The card names what a reader of the folder needs to know: the base model (the student), the
teacher, the objective and its weights, the steps, the prompts, the measures and accuracy at
that point, and the opd version. `FinalModelHook` exports the last checkpoint as the run's model
folder (`OUT/model`: the weights and tokenizer without the optimizer state, linked rather than
copied where the file system allows) with its card when a run ends.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from opd import metrics as M
from opd.io import atomic_folder, fmt, write_text_atomic
from opd.run.folder import CHECKPOINT_STATE, RunFolder
from opd.runtime import StepHook, is_main_process
from opd.version import __version__

CARD_FILE = "README.md"
TRAINING_STATE = CHECKPOINT_STATE | {CARD_FILE}
"""Checkpoint files and folders that are not part of the exported model: those that resume
training, and the checkpoint's card (the export writes its own)."""
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
CARD_MEASURES = (M.LOSS, M.OVERLAP_RATIO, M.OVERLAP_TOKEN_ADVANTAGE, M.ENTROPY_GAP,
                 M.OVERLAP_MASS_STUDENT, M.OVERLAP_MASS_TEACHER, M.STUDENT_ENTROPY,
                 M.TEACHER_ENTROPY, M.REVERSE_KL, M.RESPONSE_LENGTH, M.TRUNCATION_RATE,
                 M.TRAIN_REWARD)
"""The measures a card lists (those the step logged)."""


def _is_hub_id(name: str) -> bool:
    return bool(name) and not Path(name).exists() and bool(HUB_ID.fullmatch(name))


def _objective(config: Any) -> str:
    o = config.objective
    if not config.distill_weight:
        return "none (GRPO: outcome reward only)"
    detail = {"topk": f"k={o.k}, strategy {o.strategy}, weighting {o.weighting}",
              "subset_kl": f"k={o.k}, strategy {o.strategy}", "jsd": f"β={o.beta}"}.get(o.name)
    text = f"`{o.name}`" + (f" ({detail})" if detail else "")
    if o.teacher_temperature != 1.0:
        text += f", teacher temperature {o.teacher_temperature:g}"
    return text


def front_matter(config: Any) -> dict[str, Any]:
    """The card's metadata: base_model, library_name, tags (and datasets for hub prompts)."""
    tags = ["opd", "on-policy-distillation" if config.distill_weight else "grpo"]
    if config.distill_weight:
        tags.append(f"objective-{config.objective.name}")
    if config.outcome_weight and config.distill_weight:
        tags.append("outcome-reward")
    if config.lora_rank:
        tags.append("lora")
    meta: dict[str, Any] = {"base_model": config.student,
                            "library_name": "peft" if config.lora_rank else "transformers",
                            "pipeline_tag": "text-generation", "tags": tags}
    hub_sets = [p for p in (config.prompts, config.eval_prompts) if p and _is_hub_id(p)]
    if hub_sets:
        meta["datasets"] = list(dict.fromkeys(hub_sets))
    return meta


def model_card(config: Any, *, step: int, record: Mapping[str, Any] | None = None,
               initial_accuracy: float | None = None, accuracy: float | None = None,
               final: bool = False) -> str:
    """README.md text of a checkpoint at `step` (or of the final model) of the run `config`
    (a TrainConfig): front matter, what was trained from what and how, the step's measures."""
    record = record or {}
    name = config.run_name or Path(config.out).name
    teacher = f"`{config.teacher}`" if config.teacher and config.distill_weight else "none"
    weights = (f"distill_weight {config.distill_weight:g}, outcome_weight "
               f"{config.outcome_weight:g} (verifier {config.verifier}), kl_penalty "
               f"{config.kl_penalty:g}")
    data = f"`{config.prompts}`"
    if config.split:
        data += f" (split {config.split})"
    data += (f"; {config.prompts_per_step} prompts × {config.samples_per_prompt} rollouts per "
             f"step, at most {config.max_new_tokens} new tokens")
    evaluated = (f"avg@{config.eval_samples_per_prompt} on `{config.eval_prompts}`: "
                 f"{fmt(initial_accuracy, '.4g')} before training, {fmt(accuracy, '.4g')} at the "
                 "latest evaluation"
                 if config.eval_prompts else "not evaluated (no eval_prompts)")
    what = "final model" if final else f"checkpoint at step {step}"
    lines = [
        "---", yaml.safe_dump(front_matter(config), sort_keys=False).strip(), "---", "",
        f"# {name}: {what}", "",
        f"Trained with opd {__version__}: "
        + ("the student sampled its own responses and the teacher scored every token of them "
           "(on-policy distillation)." if config.distill_weight else
           "the student sampled its own responses and learned from the verifier's reward "
           "(GRPO)."), "",
        "| | |", "|---|---|",
        f"| base model (student) | `{config.student}` |",
        f"| teacher | {teacher} |",
        f"| objective | {_objective(config)}; {weights} |",
        f"| steps | {step} of {config.max_steps} (lr {config.lr:g}, {config.lr_schedule}) |",
        f"| data | {data} |",
        f"| accuracy | {evaluated} |",
        *([f"| LoRA | rank {config.lora_rank}: the folder holds the adapters of the base model |"]
          if config.lora_rank else []),
        f"| opd version | {__version__} |", "",
    ]
    measures = [(key, record[key]) for key in CARD_MEASURES if record.get(key) is not None]
    if measures:
        lines += [f"## Measures at step {record.get(M.STEP, step)}", "",
                  "What each one means: opd's docs/metrics.md.", "",
                  "| measure | value |", "|---|---|"]
        lines += [f"| {key} | {fmt(value, '.4g')} |" for key, value in measures]
        lines.append("")
    loader = ("from peft import AutoPeftModelForCausalLM\n"
              "model = AutoPeftModelForCausalLM.from_pretrained(folder)" if config.lora_rank else
              "from transformers import AutoModelForCausalLM\n"
              "model = AutoModelForCausalLM.from_pretrained(folder)")
    lines += ["## Use", "", "```python", "from transformers import AutoTokenizer", loader.split("\n")[0],
              "", 'folder = "path/to/this/folder"', loader.split("\n")[1],
              "tokenizer = AutoTokenizer.from_pretrained(folder)", "```", ""]
    return "\n".join(lines)


def write_card(folder: str | Path, text: str) -> Path:
    """Write README.md into `folder`, atomically."""
    path = Path(folder) / CARD_FILE
    write_text_atomic(path, text)
    return path


def read_card(folder: str | Path) -> tuple[dict[str, Any], str]:
    """The front matter (as a mapping) and the markdown body of a folder's README.md."""
    text = (Path(folder) / CARD_FILE).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}, text
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head) or {}, body


def export_model(checkpoint: str | Path, folder: str | Path, card: str) -> Path:
    """The model files of a checkpoint (no optimizer, scheduler or RNG state) as an HF model
    folder with its card: built beside `folder`, then renamed into place. Files are hard links
    where the file system allows (no second copy of the weights), else copies."""
    checkpoint, folder = Path(checkpoint), Path(folder)
    with atomic_folder(folder) as tmp:
        for source in sorted(checkpoint.rglob("*")):
            relative = source.relative_to(checkpoint)
            if source.is_dir() or relative.parts[0] in TRAINING_STATE:
                continue
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
        write_card(tmp, card)
    return folder


class FinalModelHook(StepHook):
    """When a run ends: its last checkpoint exported as `OUT/model` with the final card
    (measures of the last step, initial and final accuracy); the summary gains `final_model`."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def on_end(self, summary: dict[str, Any]) -> None:
        checkpoint = summary.get("final_checkpoint")
        if not checkpoint or not is_main_process():
            return
        records = M.read(self.config.out)
        last = records[-1] if records else {}
        accuracy = next((r[M.ACCURACY] for r in reversed(records) if r.get(M.ACCURACY) is not None),
                        None)
        card = model_card(self.config, step=summary["steps"], record=last,
                          initial_accuracy=summary.get("initial_accuracy"), accuracy=accuracy,
                          final=True)
        folder = export_model(checkpoint, RunFolder(self.config.out).model, card)
        summary["final_model"] = str(folder)
