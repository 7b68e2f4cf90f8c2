"""Prompt sets: load jsonl or parquet, normalise to chat messages, render for a tokenizer.

Accepted rows (one per prompt):
- `{"prompt": "text", "answer": "…"}`
- `{"messages": [{"role": "user", "content": "…"}, …], "answer": "…"}`
- verl-style parquet: `prompt` is a list of messages, the answer in `reward_model.ground_truth`.
The answer is optional (needed only for evaluation and outcome rewards). A row must have a
non-empty prompt; rows that carry an `id` must carry distinct ones. A file that is not what its
name says (not UTF-8, not parquet, cut short) is refused with its name and the line at fault.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd.errors import OPDError, one_line
from opd.io import write_jsonl_atomic

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PromptRecord:
    """One prompt as chat messages, with its reference answer when known; `source` says where
    it was read (file and row), for messages about it."""

    messages: Messages
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="", compare=False)


ROW_HINT = "each row needs a 'prompt' text or 'messages' [{'role': …, 'content': …}]"


def _messages(prompt: Any, where: str) -> Messages:
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list | tuple) and all(isinstance(m, dict) for m in prompt):
        messages = []
        for number, message in enumerate(prompt, start=1):
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise OPDError(f"{where}: message {number} needs a 'role' and a text 'content' "
                               f"(got {sorted(message)} with content of type "
                               f"{type(content).__name__}); {ROW_HINT}")
            messages.append({"role": role, "content": content})
    else:
        raise OPDError(f"{where}: 'prompt'/'messages' must be a string or a list of "
                       "{'role': …, 'content': …} messages")
    if not messages:
        raise OPDError(f"{where}: the prompt has no messages; give it at least one or remove the row")
    if not any(m["content"].strip() for m in messages):
        raise OPDError(f"{where}: the prompt is empty; give it text or remove the row")
    return messages


def _row_to_record(row: Any, where: str) -> PromptRecord:
    if not isinstance(row, dict):
        raise OPDError(f"{where} is a JSON {type(row).__name__}, not an object; {ROW_HINT}")
    prompt = row.get("messages", row.get("prompt"))
    if prompt is None:
        fields = ", ".join(map(repr, sorted(row))) or "none"
        raise OPDError(f"{where}: no 'prompt' or 'messages' field (it has {fields}); each row "
                       "needs one of them")
    messages = _messages(prompt, where)
    answer = row.get("answer")
    if answer is None and isinstance(row.get("reward_model"), dict):
        answer = row["reward_model"].get("ground_truth")
    meta = {k: v for k, v in row.items() if k not in {"prompt", "messages", "answer"}}
    return PromptRecord(messages, None if answer is None else str(answer), meta, where)


def _read_parquet(path: Path, field: str) -> list[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        with path.open("rb") as handle:
            head = handle.read(64).lstrip()[:1]
        hint = ("it looks like JSON text: name it .jsonl" if head in (b"{", b"[")
                else "the file is cut short or not parquet: write it again")
        raise OPDError(f"{field}: {path} is not a readable parquet file ({one_line(err, 100)}); "
                       f"{hint}") from None


def _read_json_lines(path: Path, field: str) -> list[Any]:
    data = path.read_bytes()
    if data.startswith(b"PAR1"):
        raise OPDError(f"{field}: {path} is a parquet file named {path.suffix}; rename it .parquet")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise OPDError(f"{field}: {path}:{line} is not UTF-8 text (byte 0x{data[err.start]:02x}); "
                       "save the file as UTF-8") from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise OPDError(f"{field}: {path}:{err.lineno} is not valid JSON ({err.msg}); the file "
                           "may be cut short: fix or write it again") from None
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise OPDError(f"{field}: {path}:{lineno} is not valid JSON ({err.msg}); one object "
                           "per line — fix or remove that line (a file cut short ends in one)") from None
    return rows


def _check_ids(records: Sequence[PromptRecord], path: Path, field: str) -> None:
    """Rows that carry an `id` must carry distinct ones."""
    seen: dict[str, int] = {}
    for number, record in enumerate(records, start=1):
        if record.meta.get("id") is None:
            continue
        key = json.dumps(record.meta["id"], sort_keys=True, default=str)
        if key in seen:
            raise OPDError(f"{field}: {path} rows {seen[key]} and {number} share the id {key}; "
                           "give every row its own id (or drop the id field)")
        seen[key] = number


def load_prompts(path: str | Path, field: str = "prompts") -> list[PromptRecord]:
    """Read a prompt file (.jsonl, .json or .parquet); errors name `field` (the setting that
    gave the file), the file and the row."""
    if not str(path):
        raise OPDError(f"{field}: no prompt file given; pass --{field.replace('_', '-')} FILE")
    path = Path(path)
    if path.is_dir():
        raise OPDError(f"{field}: {str(path)!r} is a folder, not a prompt file; give a .jsonl or "
                       ".parquet file")
    if not path.is_file():
        raise OPDError(f"{field}: file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            rows = _read_parquet(path, field)
        elif suffix in {".jsonl", ".json"}:
            rows = _read_json_lines(path, field)
        else:
            raise OPDError(
                f"{field}: {str(path)!r} has suffix {suffix!r}; use .jsonl or .parquet"
            )
    except OSError as err:
        raise OPDError(f"{field}: cannot read {path} ({err.strerror})") from None
    if not isinstance(rows, list):
        raise OPDError(f"{field}: {path} holds a JSON {type(rows).__name__}; give a list of rows")
    if not rows:
        raise OPDError(f"{field}: {str(path)!r} holds no prompts; give a file with at least one row")
    records = [_row_to_record(row, f"{field}: {path} row {i + 1}") for i, row in enumerate(rows)]
    _check_ids(records, path, field)
    return records


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


def render_prompt(messages: Messages, tokenizer: Any, template: str | None = None,
                  chat_template_kwargs: dict[str, Any] | None = None) -> str:
    """Prompt text for generation.

    `template` (a str with `{prompt}`, filled with the last user message) wins; else the
    tokenizer's chat template with a generation prompt, given `chat_template_kwargs` as extra
    variables (e.g. `enable_thinking`); else, for a single user message, its text. A
    conversation (a system prompt, several turns) needs a chat template or `template`: joining
    its contents would drop who said what, so it is refused.
    """
    if template is not None:
        user = [m["content"] for m in messages if m["role"] == "user"]
        return template.format(prompt=user[-1] if user else "")
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 **(chat_template_kwargs or {}))
        except Exception as err:  # the template's own checks (jinja)
            raise OPDError(f"the tokenizer's chat template cannot render this prompt "
                           f"({one_line(err, 100)}); fix the messages or pass --template") from None
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    roles = ", ".join(m["role"] for m in messages)
    raise OPDError(f"a prompt of {len(messages)} messages ({roles}) needs a chat template, and the "
                   "tokenizer has none; pass --template with {prompt} (the last user message) or "
                   "use a tokenizer with a chat template")
