"""Every error a user can meet says what is wrong and how to fix it, and leaves no debris."""

from __future__ import annotations

import json

import pytest

from opd.cli import main
from tests.conftest import make_model


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def train_args(tiny_pair, out, *extra):
    return ["train", "--student", str(tiny_pair["student"]), "--teacher",
            str(tiny_pair["teacher"]), "--prompts", str(tiny_pair["prompts"]), "--out", str(out),
            "--max-steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2",
            "--max-new-tokens", "4", "--set", "progress=false", *extra]


def test_missing_model_folder(tiny_pair, tmp_path, capsys):
    args = train_args(tiny_pair, tmp_path / "run")
    args[args.index("--student") + 1] = str(tmp_path / "no-such-model")
    code, err = run_cli(args, capsys)
    assert code == 2
    assert "student:" in err and "no-such-model" in err and "save_pretrained" in err
    assert "Traceback" not in err


def test_tokenizer_mismatch_names_both_and_the_first_differing_id(tiny_pair, tmp_path, capsys):
    other = make_model(tmp_path / "other", seed=3)
    vocab_file = json.loads((other / "tokenizer.json").read_text())
    vocab = vocab_file["model"]["vocab"]
    vocab["zebra"], vocab["answer"] = vocab.pop("answer"), len(vocab)
    (other / "tokenizer.json").write_text(json.dumps(vocab_file))
    args = train_args(tiny_pair, tmp_path / "run")
    args[args.index("--teacher") + 1] = str(other)
    code, err = run_cli(args, capsys)
    assert code == 2
    assert "tokenizer mismatch" in err and str(other) in err and str(tiny_pair["student"]) in err
    assert "'answer' vs 'zebra'" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_empty_prompt_file(tiny_pair, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    args = train_args(tiny_pair, tmp_path / "run")
    args[args.index("--prompts") + 1] = str(empty)
    code, err = run_cli(args, capsys)
    assert code == 2 and "holds no prompts" in err and "empty.jsonl" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ('{"text": "hi"}\n', "no 'prompt' or 'messages' field"),
        ('{"prompt": 5}\n', "must be a string or a list"),
        ("not json\n", ":1 is not valid JSON"),
    ],
)
def test_malformed_prompt_rows_name_the_row(tiny_pair, tmp_path, capsys, rows, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(rows)
    args = train_args(tiny_pair, tmp_path / "run")
    args[args.index("--prompts") + 1] = str(bad)
    code, err = run_cli(args, capsys)
    assert code == 2 and message in err


def test_wrong_prompt_file_type_and_missing_file(tiny_pair, tmp_path, capsys):
    csv = tmp_path / "p.csv"
    csv.write_text("a\n")
    for path, message in ((csv, "use .jsonl or .parquet"), (tmp_path / "nope.jsonl", "does not exist")):
        args = train_args(tiny_pair, tmp_path / "run")
        args[args.index("--prompts") + 1] = str(path)
        code, err = run_cli(args, capsys)
        assert code == 2 and message in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "lr=abc"], "config: lr must be a float, got 'abc'"),
        (["--set", "learning_rate=1"], "unknown key 'learning_rate'"),
        (["--set", "objective.name=kl"], "config: objective.name must be one of"),
        (["--objective.k", "0"], "config: objective.k must be at least 1, got 0"),
        (["--set", "objective=topk"], "objective is a group of settings; set one of them"),
        (["--set", "objective.size=3"], "unknown key 'objective.size'"),
        (["--set", "cold_start.sft_lr=0"], "cold_start.sft_lr must be positive"),
        (["--set", "loss_aggregation=sum"], "loss_aggregation must be one of"),
        (["--set", "top_p=0"], "top_p must lie in (0, 1]"),
        (["--set", "outcome_weight=1", "--set", "samples_per_prompt=1"], "needs samples_per_prompt"),
        (["--set", "lr"], "is not key=value"),
        (["--max-steps", "0"], "max_steps must be at least 1"),
        (["--profile", "gpu-huge"], "profile: unknown value 'gpu-huge'"),
        (["--set", "parallel=zero3"], "config: parallel must be one of"),
        (["--set", "mixed_precision=bf16"], "mixed_precision: bf16 keeps float32 master weights"),
        (["--set", "mixed_precision=bf16", "--set", "dtype=float32"],
         "mixed_precision: bf16 needs a distributed launch"),
    ],
)
def test_bad_config_values(tiny_pair, tmp_path, capsys, extra, message):
    code, err = run_cli(train_args(tiny_pair, tmp_path / "run", *extra), capsys)
    assert code == 2 and message in err, err


def test_missing_config_file_and_bad_yaml(tiny_pair, tmp_path, capsys):
    code, err = run_cli(train_args(tiny_pair, tmp_path / "run", "--config", "nope.yaml"), capsys)
    assert code == 2 and "--config: file 'nope.yaml' does not exist" in err
    listy = tmp_path / "c.yaml"
    listy.write_text("- 1\n- 2\n")
    code, err = run_cli(train_args(tiny_pair, tmp_path / "run", "--config", str(listy)), capsys)
    assert code == 2 and "must hold a mapping" in err


def test_existing_run_is_never_overwritten(tiny_pair, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_pair, out)) == 0
    before = (out / "metrics.jsonl").read_text()
    code, err = run_cli(train_args(tiny_pair, out), capsys)
    assert code == 2 and "already holds a run; pass --resume" in err
    assert (out / "metrics.jsonl").read_text() == before
    code, err = run_cli(train_args(tiny_pair, out, "--resume", "--seed", "5"), capsys)
    assert code == 2 and "other values of ['seed']" in err


def test_outcome_reward_needs_answers(tiny_pair, tmp_path, capsys):
    no_answers = tmp_path / "p.jsonl"
    no_answers.write_text('{"prompt": "1 + 2 ="}\n')
    args = train_args(tiny_pair, tmp_path / "run", "--set", "outcome_weight=1")
    args[args.index("--prompts") + 1] = str(no_answers)
    code, err = run_cli(args, capsys)
    assert code == 2 and "prompts: row 1 has no 'answer'" in err


def test_eval_needs_answers_and_unknown_verifier(tiny_pair, tmp_path, capsys):
    no_answers = tmp_path / "p.jsonl"
    no_answers.write_text('{"prompt": "1 + 2 ="}\n')
    code, err = run_cli(["eval", "--model", str(tiny_pair["student"]), "--prompts",
                         str(no_answers)], capsys)
    assert code == 2 and "prompts: row 1 has no 'answer'; evaluation needs an answer" in err
    code, err = run_cli(["eval", "--model", str(tiny_pair["student"]), "--prompts",
                         str(tiny_pair["prompts"]), "--verifier", "fuzzy"], capsys)
    assert code == 2 and "config: verifier must be one of ['exact', 'number', 'math'], got 'fuzzy'" in err
