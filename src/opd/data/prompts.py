"""Prompt sets: load jsonl, parquet or a Hugging Face dataset, normalise to chat messages,
render for a tokenizer.

Sources: a `.jsonl` / `.parquet` file; a folder written by `Dataset.save_to_disk` or
`DatasetDict.save_to_disk` (one `split` of it); or a hub dataset id (`name` or `owner/name`),
loaded with `datasets.load_dataset` where the network allows. Datasets need the `datasets`
package (`pip install "opd[datasets]"`).

Accepted rows (one per prompt), with the default column names:
- `{"prompt": "text", "answer": "…"}`
- `{"messages": [{"role": "user", "content": "…"}, …], "answer": "…"}`
- verl-style parquet: `prompt` is a list of messages, the answer in `reward_model.ground_truth`.
Other column names are mapped with `prompt_field`, `messages_field` and `answer_field` (a
dotted name reaches into a nested column, e.g. `reward_model.ground_truth`). The answer is
optional (needed only for evaluation and outcome rewards).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd.errors import OPDError
from opd.io import write_jsonl_atomic

Messages = list[dict[str, str]]

PROMPT_FIELD, MESSAGES_FIELD, ANSWER_FIELD = "prompt", "messages", "answer"
"""The default column names."""
DATASETS_EXTRA = 'pip install "opd[datasets]"'
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
"""What a hub dataset id looks like: `name` or `owner/name`."""
SPLIT_HELP = ("Split of a dataset folder (save_to_disk) or hub dataset (default: train, or its "
              "only split).")
PROMPT_FIELD_HELP = "Column of the prompt text (or verl-style message list)."
MESSAGES_FIELD_HELP = "Column of the chat messages (read before prompt_field when a row has both)."
ANSWER_FIELD_HELP = ("Column of the reference answer (dotted for a nested one, e.g. "
                     "reward_model.ground_truth).")
"""Help of the prompt-source settings every verb that reads prompts declares."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt as chat messages, with its reference answer when known."""

    messages: Messages
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Columns:
    """Which columns hold the prompt text, the chat messages and the answer."""

    prompt: str = PROMPT_FIELD
    messages: str = MESSAGES_FIELD
    answer: str = ANSWER_FIELD


def _lookup(row: Mapping[str, Any], name: str) -> Any:
    """`row[name]`, a dotted name reaching into nested mappings; None when absent."""
    if name in row:
        return row[name]
    value: Any = row
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _row_to_record(row: dict[str, Any], where: str, columns: Columns = Columns()) -> PromptRecord:
    prompt = _lookup(row, columns.messages)
    if prompt is None:
        prompt = _lookup(row, columns.prompt)
    if prompt is None:
        raise OPDError(f"{where}: no {columns.prompt!r} or {columns.messages!r} field; each row "
                       f"needs one of them (this row has {_names(row)}; map another column "
                       "with prompt_field or messages_field)")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list | tuple) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in prompt
    ):
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    else:
        raise OPDError(
            f"{where}: {columns.prompt!r}/{columns.messages!r} must be a string or a list of "
            "{'role': …, 'content': …} messages"
        )
    if not messages:
        raise OPDError(f"{where}: the prompt has no messages")
    answer = _lookup(row, columns.answer)
    if answer is None and columns.answer == ANSWER_FIELD and isinstance(row.get("reward_model"), dict):
        answer = row["reward_model"].get("ground_truth")
    used = {columns.prompt, columns.messages, columns.answer}
    meta = {k: v for k, v in row.items() if k not in used}
    return PromptRecord(messages, None if answer is None else str(answer), meta)


def _names(columns: Any) -> str:
    names = sorted(columns)
    return ", ".join(repr(c) for c in names) if names else "no columns"


def _check_columns(rows: Sequence[Mapping[str, Any]], columns: Columns, where: str) -> None:
    """A column named in a `*_field` setting must exist; else name the columns that do."""
    present = {key for row in rows for key in row}

    def exists(name: str) -> bool:
        return name in present or any(_lookup(row, name) is not None for row in rows)

    mapped = columns.prompt != PROMPT_FIELD or columns.messages != MESSAGES_FIELD
    if mapped and not (exists(columns.prompt) or exists(columns.messages)):
        raise OPDError(f"{where}: no column {columns.prompt!r} (prompt_field) or "
                       f"{columns.messages!r} (messages_field); its columns are {_names(present)}")
    if columns.answer != ANSWER_FIELD and not exists(columns.answer):
        raise OPDError(f"{where}: no column {columns.answer!r} (answer_field); its columns are "
                       f"{_names(present)}")


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix in {".jsonl", ".json"}:
        rows = []
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise OPDError(f"prompts: {path}:{lineno} is not valid JSON ({err.msg})") from None
        return rows
    raise OPDError(f"prompts: {str(path)!r} has suffix {suffix!r}; use .jsonl or .parquet (or a "
                   "folder written by save_to_disk)")


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise OPDError("prompts: a Hugging Face dataset needs the datasets package: "
                       f"{DATASETS_EXTRA}") from None
    return datasets


def _pick_split(splits: Mapping[str, Any], split: str | None, where: str) -> Any:
    """One split of a DatasetDict: the one asked for, else train, else the only one."""
    names = list(splits)
    if split is None:
        if "train" not in splits and len(names) > 1:
            raise OPDError(f"prompts: {where} holds the splits {names}; choose one with --split")
        split = "train" if "train" in splits else names[0]
    if split not in splits:
        raise OPDError(f"prompts: {where} has no split {split!r}; its splits are {names}")
    return splits[split]


def _read_dataset_folder(path: Path, split: str | None) -> list[dict[str, Any]]:
    if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        raise OPDError(f"prompts: {str(path)!r} is a folder but not one written by save_to_disk "
                       "(no dataset_info.json or dataset_dict.json in it)")
    datasets = _datasets()
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        data = _pick_split(data, split, repr(str(path)))
    return data.to_list()


def _read_hub(name: str, split: str | None) -> list[dict[str, Any]]:
    datasets = _datasets()
    try:
        data = datasets.load_dataset(name, split=split or "train")
    except Exception as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise OPDError(f"prompts: {name!r} is no local file or folder, and loading it as a hub "
                       f"dataset failed ({reason}); pass a .jsonl/.parquet file or a folder "
                       "written by save_to_disk") from None
    return data.to_list()


def load_prompts(path: str | Path, *, split: str | None = None, prompt_field: str = PROMPT_FIELD,
                 messages_field: str = MESSAGES_FIELD,
                 answer_field: str = ANSWER_FIELD) -> list[PromptRecord]:
    """Read a prompt set: a file (.jsonl, .json or .parquet), a folder written by
    `save_to_disk` (its `split`: by default train, or its only split) or a hub dataset id
    (where the network allows). Columns are mapped by the `*_field` names. Errors name the
    source and the row; a missing column, the columns that exist."""
    if not str(path):
        raise OPDError("prompts: no prompt file given; pass --prompts FILE")
    columns = Columns(prompt_field, messages_field, answer_field)
    text, path = str(path), Path(path)
    if path.is_file():
        rows = _read_file(path)
    elif path.is_dir():
        rows = _read_dataset_folder(path, split)
    elif path.suffix.lower() in {".jsonl", ".json", ".parquet"} or not HUB_ID.fullmatch(text):
        raise OPDError(f"prompts: file {text!r} does not exist")
    else:
        rows = _read_hub(text, split)
    if not rows:
        raise OPDError(f"prompts: {text!r} holds no prompts; give a file with at least one row")
    _check_columns(rows, columns, f"prompts: {text}")
    return [_row_to_record(row, f"prompts: {path} row {i + 1}", columns) for i, row in enumerate(rows)]


def source_of(config: Any, split: str = "split") -> dict[str, Any]:
    """The `load_prompts` keywords of a verb's config: its split (or another split setting,
    e.g. `eval_split`) and its column names."""
    return {"split": getattr(config, split), "prompt_field": config.prompt_field,
            "messages_field": config.messages_field, "answer_field": config.answer_field}


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


def render_prompt(messages: Messages, tokenizer: Any, template: str | None = None) -> str:
    """Prompt text for generation.

    `template` (a str with `{prompt}`, filled with the last user message) wins; else the
    tokenizer's chat template with a generation prompt; else the user contents joined by
    newlines.
    """
    if template is not None:
        user = [m["content"] for m in messages if m["role"] == "user"]
        return template.format(prompt=user[-1] if user else "")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)
