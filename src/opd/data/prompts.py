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
optional (needed only for evaluation and outcome rewards). A row must have a non-empty prompt;
rows that carry an `id` must carry distinct ones. A file that is not what its name says (not
UTF-8, not parquet, cut short) is refused with its name and the line at fault.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd.config.fields import PromptSource
from opd.errors import OPDError, one_line
from opd.io import write_jsonl_atomic

Messages = list[dict[str, str]]

PROMPT_FIELD, MESSAGES_FIELD, ANSWER_FIELD = "prompt", "messages", "answer"
"""The default column names."""
DATASETS_EXTRA = 'pip install "opd[datasets]"'
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
"""What a hub dataset id looks like: `name` or `owner/name`."""
@dataclass(frozen=True)
class PromptRecord:
    """One prompt as chat messages, with its reference answer when known; `source` says where
    it was read (file and row), for messages about it."""

    messages: Messages
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class Columns:
    """Which columns hold the prompt text, the chat messages and the answer."""

    prompt: str = PROMPT_FIELD
    messages: str = MESSAGES_FIELD
    answer: str = ANSWER_FIELD

    @property
    def hint(self) -> str:
        return (f"each row needs a {self.prompt!r} text or {self.messages!r} "
                "[{'role': …, 'content': …}]")


ROW_HINT = Columns().hint


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


def _messages(prompt: Any, where: str, columns: Columns = Columns()) -> Messages:
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list | tuple) and all(isinstance(m, dict) for m in prompt):
        messages = []
        for number, message in enumerate(prompt, start=1):
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise OPDError(f"{where}: message {number} needs a 'role' and a text 'content' "
                               f"(got {sorted(message)} with content of type "
                               f"{type(content).__name__}); {columns.hint}")
            messages.append({"role": role, "content": content})
    else:
        raise OPDError(f"{where}: {columns.prompt!r}/{columns.messages!r} must be a string or a "
                       "list of {'role': …, 'content': …} messages")
    if not messages:
        raise OPDError(f"{where}: the prompt has no messages; give it at least one or remove the row")
    if not any(m["content"].strip() for m in messages):
        raise OPDError(f"{where}: the prompt is empty; give it text or remove the row")
    return messages


def _row_to_record(row: Any, where: str, columns: Columns = Columns()) -> PromptRecord:
    if not isinstance(row, dict):
        raise OPDError(f"{where} is a JSON {type(row).__name__}, not an object; {columns.hint}")
    prompt = _lookup(row, columns.messages)
    if prompt is None:
        prompt = _lookup(row, columns.prompt)
    if prompt is None:
        raise OPDError(f"{where}: no {columns.prompt!r} or {columns.messages!r} field (it has "
                       f"{_names(row, 'none')}); each row needs one of them (map another column "
                       "with prompt_field or messages_field)")
    messages = _messages(prompt, where, columns)
    answer = _lookup(row, columns.answer)
    if answer is None and columns.answer == ANSWER_FIELD and isinstance(row.get("reward_model"), dict):
        answer = row["reward_model"].get("ground_truth")
    used = {columns.prompt, columns.messages, columns.answer}
    meta = {k: v for k, v in row.items() if k not in used}
    return PromptRecord(messages, None if answer is None else str(answer), meta, where)


def _names(columns: Any, empty: str = "no columns") -> str:
    names = sorted(columns)
    return ", ".join(repr(c) for c in names) if names else empty


def _check_columns(rows: Sequence[Any], columns: Columns, where: str) -> None:
    """A column named in a `*_field` setting must exist; else name the columns that do."""
    rows = [row for row in rows if isinstance(row, Mapping)]
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


def _read_file(path: Path, field: str) -> list[Any]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return _read_parquet(path, field)
        if suffix in {".jsonl", ".json"}:
            return _read_json_lines(path, field)
    except OSError as err:
        raise OPDError(f"{field}: cannot read {path} ({err.strerror})") from None
    raise OPDError(f"{field}: {str(path)!r} has suffix {suffix!r}; use .jsonl or .parquet (or a "
                   "folder written by save_to_disk)")


def _datasets(field: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise OPDError(f"{field}: a Hugging Face dataset needs the datasets package: "
                       f"{DATASETS_EXTRA}") from None
    return datasets


def _pick_split(splits: Mapping[str, Any], split: str | None, where: str) -> Any:
    """One split of a DatasetDict: the one asked for, else train, else the only one."""
    names = list(splits)
    if split is None:
        if "train" not in splits and len(names) > 1:
            raise OPDError(f"{where} holds the splits {names}; choose one with --split")
        split = "train" if "train" in splits else names[0]
    if split not in splits:
        raise OPDError(f"{where} has no split {split!r}; its splits are {names}")
    return splits[split]


def _read_dataset_folder(path: Path, split: str | None, field: str) -> list[dict[str, Any]]:
    if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        raise OPDError(f"{field}: {str(path)!r} is a folder, not a prompt file, and not one "
                       "written by save_to_disk (no dataset_info.json or dataset_dict.json in "
                       "it); give a .jsonl or .parquet file or a saved dataset")
    datasets = _datasets(field)
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        data = _pick_split(data, split, f"{field}: {str(path)!r}")
    return data.to_list()


def _read_hub(name: str, split: str | None, field: str) -> list[dict[str, Any]]:
    datasets = _datasets(field)
    try:
        data = datasets.load_dataset(name, split=split or "train")
    except Exception as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise OPDError(f"{field}: {name!r} is no local file or folder, and loading it as a hub "
                       f"dataset failed ({reason}); pass a .jsonl/.parquet file or a folder "
                       "written by save_to_disk") from None
    return data.to_list()


def _check_ids(records: Sequence[PromptRecord], path: Path | str, field: str) -> None:
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


def load_prompts(path: str | Path, field: str = "prompts", *, split: str | None = None,
                 prompt_field: str = PROMPT_FIELD, messages_field: str = MESSAGES_FIELD,
                 answer_field: str = ANSWER_FIELD) -> list[PromptRecord]:
    """Read a prompt set: a file (.jsonl, .json or .parquet), a folder written by
    `save_to_disk` (its `split`: by default train, or its only split) or a hub dataset id
    (where the network allows). Columns are mapped by the `*_field` names. Errors name `field`
    (the setting that gave the source), the source and the row; a missing column, the columns
    that exist."""
    if not str(path):
        raise OPDError(f"{field}: no prompt file given; pass --{field.replace('_', '-')} FILE")
    columns = Columns(prompt_field, messages_field, answer_field)
    text, path = str(path), Path(path)
    if path.is_file():
        rows = _read_file(path, field)
    elif path.is_dir():
        rows = _read_dataset_folder(path, split, field)
    elif path.suffix.lower() in {".jsonl", ".json", ".parquet"} or not HUB_ID.fullmatch(text):
        raise OPDError(f"{field}: file {text!r} does not exist")
    else:
        rows = _read_hub(text, split, field)
    if not isinstance(rows, list):
        raise OPDError(f"{field}: {path} holds a JSON {type(rows).__name__}; give a list of rows")
    if not rows:
        raise OPDError(f"{field}: {text!r} holds no prompts; give a file with at least one row")
    _check_columns(rows, columns, f"{field}: {text}")
    records = [_row_to_record(row, f"{field}: {path} row {i + 1}", columns)
               for i, row in enumerate(rows)]
    _check_ids(records, path, field)
    return records


def source_of(config: PromptSource, split: str = "split") -> dict[str, Any]:
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
