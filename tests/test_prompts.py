"""Prompt sets from Hugging Face datasets: save_to_disk folders, splits, column mapping, and
the messages that name what exists when something is missing."""

from __future__ import annotations

import json
import sys

import datasets
import pytest

from opd.cli import main
from opd.data.prompts import load_prompts
from opd.errors import OPDError

ROWS = [{"question": f"{a} + {b} =", "solution": {"final": str(a + b)}, "source": "tiny"}
        for a in range(3) for b in range(2)]


@pytest.fixture
def saved(tmp_path):
    """A Dataset and a DatasetDict written by save_to_disk."""
    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]),
                          "test": datasets.Dataset.from_list(ROWS[4:])}).save_to_disk(str(splits))
    return {"single": single, "splits": splits}


def test_a_saved_dataset_loads_with_its_columns_mapped(saved):
    records = load_prompts(saved["single"], prompt_field="question", answer_field="solution.final")
    assert len(records) == len(ROWS)
    assert records[3].messages == [{"role": "user", "content": "1 + 1 ="}]
    assert records[3].answer == "2"
    assert records[3].meta == {"solution": {"final": "2"}, "source": "tiny"}


def test_a_dataset_dict_takes_train_by_default_or_the_split_asked_for(saved, tmp_path):
    fields = {"prompt_field": "question", "answer_field": "solution.final"}
    assert len(load_prompts(saved["splits"], **fields)) == 4
    test = load_prompts(saved["splits"], split="test", **fields)
    assert [r.answer for r in test] == ["2", "3"]
    with pytest.raises(OPDError, match=r"has no split 'dev'; its splits are \['train', 'test'\]"):
        load_prompts(saved["splits"], split="dev", **fields)
    no_train = tmp_path / "no-train"
    datasets.DatasetDict({"a": datasets.Dataset.from_list(ROWS),
                          "b": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(no_train))
    with pytest.raises(OPDError, match=r"holds the splits \['a', 'b'\]; choose one with --split"):
        load_prompts(no_train, **fields)


def test_a_missing_column_names_the_columns_that_exist(saved, tmp_path):
    with pytest.raises(OPDError) as err:
        load_prompts(saved["single"], prompt_field="problem")
    message = str(err.value)
    assert "no column 'problem' (prompt_field)" in message
    assert "its columns are 'question', 'solution', 'source'" in message
    with pytest.raises(OPDError, match="no column 'final' \\(answer_field\\); its columns are"):
        load_prompts(saved["single"], prompt_field="question", answer_field="final")
    # With the default names, the row error names the row's columns.
    with pytest.raises(OPDError, match=r"no 'prompt' or 'messages' field.*'question', 'solution'"):
        load_prompts(saved["single"])
    # The same mapping applies to jsonl files.
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    records = load_prompts(jsonl, prompt_field="question", answer_field="solution.final")
    assert [r.answer for r in records] == ["0", "1", "1", "2", "2", "3"]


def test_folders_that_are_not_datasets_and_missing_extras_are_explained(tmp_path, monkeypatch):
    (tmp_path / "plain").mkdir()
    with pytest.raises(OPDError, match="is a folder, not a prompt file, and not one written by save_to_disk"):
        load_prompts(tmp_path / "plain")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "d"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(OPDError, match=r'needs the datasets package: pip install "opd\[datasets\]"'):
        load_prompts(tmp_path / "d", prompt_field="question")


def test_a_name_that_is_no_path_is_tried_on_the_hub(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    records = load_prompts("someone/tiny-sums", split="test", prompt_field="question")
    assert calls == [("someone/tiny-sums", "test")] and len(records) == len(ROWS)

    def offline(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(OPDError, match="loading it as a hub dataset failed \\(no network\\)"):
        load_prompts("someone/tiny-sums")
    with pytest.raises(OPDError, match=r"file 'missing\.jsonl' does not exist"):
        load_prompts("missing.jsonl")


def test_verbs_read_prompts_from_a_saved_dataset(tiny_pair, saved, capsys):
    code = main(["eval", "--model", str(tiny_pair["student"]), "--prompts", str(saved["splits"]),
                 "--split", "test", "--prompt-field", "question", "--answer-field",
                 "solution.final", "--max-new-tokens", "4"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_prompts"] == 2
    code = main(["eval", "--model", str(tiny_pair["student"]), "--prompts", str(saved["single"]),
                 "--prompt-field", "problem"])
    assert code == 2 and "its columns are 'question'" in capsys.readouterr().err


def test_training_reads_its_prompts_and_eval_prompts_from_a_saved_dataset(tiny_pair, saved, tmp_path):
    import opd

    result = opd.train(student=str(tiny_pair["student"]), teacher=str(tiny_pair["teacher"]),
                       prompts=str(saved["splits"]), eval_prompts=str(saved["splits"]),
                       eval_split="test", prompt_field="question", answer_field="solution.final",
                       outcome_weight=0.5, out=str(tmp_path / "run"), max_steps=1,
                       prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4,
                       progress=False)
    assert result.steps == 1 and result.final_measures["train_reward"] is not None
    assert result.final_accuracy is not None
    with pytest.raises(OPDError, match="no column 'problem' \\(prompt_field\\)"):
        opd.train(student=str(tiny_pair["student"]), prompts=str(saved["single"]),
                  prompt_field="problem", out=str(tmp_path / "bad"))
