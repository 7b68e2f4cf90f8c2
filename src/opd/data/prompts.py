"""Prompt sets: load jsonl or parquet, normalise to chat messages, render for a tokenizer.

Accepted rows (one per prompt):
- `{"prompt": "text", "answer": "…"}`
- `{"messages": [{"role": "user", "content": "…"}, …], "answer": "…"}`
- verl-style parquet: `prompt` is a list of messages, the answer in `reward_model.ground_truth`.
The answer is optional (needed only for evaluation and outcome rewards).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd.errors import OPDError
from opd.io import write_jsonl_atomic

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PromptRecord:
    """One prompt as chat messages, with its reference answer when known."""

    messages: Messages
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _row_to_record(row: dict[str, Any], where: str) -> PromptRecord:
    prompt = row.get("messages", row.get("prompt"))
    if prompt is None:
        raise OPDError(f"{where}: no 'prompt' or 'messages' field; each row needs one of them")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list | tuple) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in prompt
    ):
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    else:
        raise OPDError(
            f"{where}: 'prompt'/'messages' must be a string or a list of "
            "{'role': …, 'content': …} messages"
        )
    if not messages:
        raise OPDError(f"{where}: the prompt has no messages")
    answer = row.get("answer")
    if answer is None and isinstance(row.get("reward_model"), dict):
        answer = row["reward_model"].get("ground_truth")
    meta = {k: v for k, v in row.items() if k not in {"prompt", "messages", "answer"}}
    return PromptRecord(messages, None if answer is None else str(answer), meta)


def load_prompts(path: str | Path) -> list[PromptRecord]:
    """Read a prompt file (.jsonl, .json or .parquet); errors name the file and the row."""
    if not str(path):
        raise OPDError("prompts: no prompt file given; pass --prompts FILE")
    path = Path(path)
    if not path.is_file():
        raise OPDError(f"prompts: file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif suffix in {".jsonl", ".json"}:
        rows = []
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise OPDError(f"prompts: {path}:{lineno} is not valid JSON ({err.msg})") from None
    else:
        raise OPDError(
            f"prompts: {str(path)!r} has suffix {suffix!r}; use .jsonl or .parquet"
        )
    if not rows:
        raise OPDError(f"prompts: {str(path)!r} holds no prompts; give a file with at least one row")
    return [_row_to_record(row, f"prompts: {path} row {i + 1}") for i, row in enumerate(rows)]


def require_answers(records: Sequence[PromptRecord], field: str, what: str) -> None:
    """Stop, naming the first row without an answer, when `what` needs one on every row."""
    missing = next((i for i, r in enumerate(records) if r.answer is None), None)
    if missing is not None:
        raise OPDError(f"{field}: row {missing + 1} has no 'answer'; {what} needs an answer on "
                       "every row")


def save_prompts(records: list[PromptRecord], path: str | Path) -> None:
    """Write records as jsonl (messages, answer, meta fields flattened), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(path, ({"messages": r.messages, "answer": r.answer, **r.meta} for r in records))


def render_prompt(messages: Messages, tokenizer: Any, template: str | None = None,
                  chat_template_kwargs: dict[str, Any] | None = None) -> str:
    """Prompt text for generation.

    `template` (a str with `{prompt}`, filled with the last user message) wins; else the
    tokenizer's chat template with a generation prompt, given `chat_template_kwargs` as extra
    variables (e.g. `enable_thinking`); else the user contents joined by newlines.
    """
    if template is not None:
        user = [m["content"] for m in messages if m["role"] == "user"]
        return template.format(prompt=user[-1] if user else "")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **(chat_template_kwargs or {}))
    return "\n".join(m["content"] for m in messages)
