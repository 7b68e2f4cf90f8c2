"""`opd select-prompts`: the pure ranking and mixing rules, the rendered prompts reaching the
student verbatim, an end-to-end run on the tiny pair, and the errors a user can meet."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from opd.cli import main
from opd.config.training import build_config
from opd.data.prompts import PromptRecord, load_prompts, render_prompt
from opd.errors import OPDError
from opd.lab.tokenizer import build_tokenizer
from opd.recipes.select_prompts import (
    SelectConfig,
    as_text,
    combined_scores,
    entropy_effect,
    mix_count,
    mix_in,
    percentile_ranks,
    subset_means,
    top_fraction,
    write_prompts,
)
from tests.conftest import make_model
from tests.support import select_args


def test_percentile_ranks_share_ties_and_span_zero_to_one():
    assert percentile_ranks([3.0, 1.0, 2.0]) == [1.0, 0.0, 0.5]
    assert percentile_ranks([1.0, 1.0, 5.0, 0.0]) == [0.5, 0.5, 1.0, 0.0]
    assert percentile_ranks([7.0]) == [1.0]


def test_combined_scores_one_measure_is_its_values_several_the_mean_rank():
    rows = [{"a": 0.1, "b": 3.0}, {"a": 0.3, "b": 1.0}, {"a": 0.2, "b": 2.0}]
    assert combined_scores(rows, ["a"]) == [0.1, 0.3, 0.2]
    assert combined_scores(rows, ["a", "b"]) == [0.5, 0.5, 0.5]
    with pytest.raises(OPDError, match="advantage needs an 'answer'"):
        combined_scores([{"advantage": None}], ["advantage"])


@pytest.mark.parametrize(("n", "fraction", "count"), [(10, 0.5, 5), (10, 0.25, 3), (10, 1.0, 10),
                                                       (3, 0.01, 1), (7, 0.3, 3), (100, 0.07, 7)])
def test_top_fraction_keeps_ceil_of_the_share_best_first(n, fraction, count):
    scores = [random.Random(n).random() for _ in range(n)]
    kept = top_fraction(scores, fraction)
    assert len(kept) == count
    assert [scores[i] for i in kept] == sorted(scores, reverse=True)[:count]
    assert top_fraction([1.0, 2.0, 2.0, 0.0], 0.5) == [1, 2]  # ties: earlier index first


@pytest.mark.parametrize(("kept", "share", "mixed"), [(8, 0.2, 2), (40, 0.2, 10), (10, 0.5, 10),
                                                      (9, 0.25, 3), (5, 0.0, 0), (1, 0.1, 0)])
def test_mix_count_makes_the_share_of_the_output(kept, share, mixed):
    assert mix_count(kept, share) == mixed
    if mixed:
        assert abs(mixed / (kept + mixed) - share) <= 0.5 / (kept + mixed) + 1e-9


def test_mix_in_is_seeded_distinct_and_capped_by_the_pool():
    pool = list(range(100, 150))
    first = mix_in(pool, 40, 0.2, seed=3)
    assert len(first) == 10 == len(set(first)) and set(first) <= set(pool)
    assert mix_in(pool, 40, 0.2, seed=3) == first
    assert mix_in(pool, 40, 0.2, seed=4) != first
    assert sorted(mix_in(pool[:4], 40, 0.2, seed=3)) == pool[:4]


def test_subset_means_weight_prompts_by_tokens_and_entropy_effect():
    prompts = [{"tokens": 1, "x": 1.0}, {"tokens": 3, "x": 0.0}, {"tokens": 2, "x": 0.5}]
    assert subset_means(prompts, [0, 1], ["x"]) == {"x": 0.25}
    assert subset_means(prompts, [0, 2], ["x"]) == {"x": 2 / 3}
    effect = entropy_effect([{"student_entropy": h, "overlap_ratio": 0.5} for h in (1.0, 0.8, 0.6, 0.2)])
    assert effect["late_mean"] == pytest.approx(0.4) and effect["change"] == pytest.approx(-0.6)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("keep_fraction", 0.0, r"keep_fraction must lie in \(0, 1\]"),
    ("keep_fraction", 1.5, r"keep_fraction must lie in \(0, 1\]"),
    ("mix_share", 1.0, r"mix_share must lie in \[0, 1\)"),
    ("mix_share", -0.1, r"mix_share must lie in \[0, 1\)"),
    ("template", "own", r"template must be one of \['teacher', 'student'\]"),
    ("rank_by", ("overlap",), "rank_by must be each one of"), ("rank_by", (), "rank_by needs"),
    ("trial_steps", -1, "trial_steps must be at least 0"),
    ("samples_per_prompt", 0, "config: samples_per_prompt must be at least 1"),
    ("trial_profile", "gpu", "trial_profile must be one of"),
])
def test_bad_settings_are_explained(field, value, message):
    with pytest.raises(OPDError, match=message):
        SelectConfig(student="s", teacher="t", prompts="p", out="o", **{field: value})


def test_rendered_prompts_reach_a_student_with_its_own_chat_template_verbatim(tmp_path):
    """The teacher's rendering, written as text, is what the student sees under the written
    train.yaml settings; its own chat template would wrap the text a second time."""
    student, teacher = build_tokenizer(1), build_tokenizer(2)
    original = [PromptRecord([{"role": "user", "content": "12 + 34"}], "4 6", {"skill": "nocarry"})]
    text = render_prompt(original[0].messages, teacher)
    write_prompts(tmp_path / "p.jsonl", as_text(original, [text]), [{"role": "kept"}])
    row = json.loads((tmp_path / "p.jsonl").read_text())
    assert row["prompt"] == text and row["skill"] == "nocarry" and row["answer"] == "4 6"
    loaded = load_prompts(tmp_path / "p.jsonl")[0]
    config = build_config({"prompts": str(tmp_path / "p.jsonl"), "template": "{prompt}"})
    assert render_prompt(loaded.messages, student, config.template) == text
    assert render_prompt(loaded.messages, student) != text  # wrapped again without it
    assert student(text)["input_ids"] == teacher(text)["input_ids"]


def test_end_to_end_on_the_tiny_pair(tiny_pair, tmp_path, capsys, saved_figures):
    out = tmp_path / "sel"
    args = select_args(tiny_pair, out, "--teacher-template", "a b {prompt}", "--keep-fraction", "0.5",
                       "--mix-share", "0.2", "--rank-by", "overlap_ratio,advantage")
    assert main(args) == 0
    assert "step-0 overlap ratio" in capsys.readouterr().out
    selection = json.loads((out / "selection.json").read_text())
    assert selection["counts"] == {"candidates": 8, "kept": 4, "dropped": 4, "mixed_in": 1, "output": 5}
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["selection"]["role"] for r in rows] == ["kept"] * 4 + ["mixed"]
    assert all(r["prompt"].startswith("a b ") for r in rows)  # the teacher's template
    kept = [p for p in selection["prompts"] if p["kept"]]
    assert min(p["score"] for p in kept) >= max(p["score"] for p in selection["prompts"] if not p["kept"])
    assert sum(p["mixed_in"] for p in selection["prompts"]) == 1
    assert {r["selection"]["candidate"] for r in rows} == {p["candidate"] for p in selection["prompts"]
                                                            if p["kept"] or p["mixed_in"]}
    step0 = selection["step0"]
    assert set(step0) == {"student_template", "teacher_template", "fresh_rollouts"}
    # Fresh rollouts of the 4 kept and the 4 dropped candidates, 86 response tokens each:
    # 116 and 114 of their 4 × 86 top-4 slots shared, pooled over all 8 candidates.
    fresh = {name: values["overlap_ratio"] for name, values in step0["fresh_rollouts"].items()}
    assert fresh["selected"] == pytest.approx(116 / 344, abs=1e-12)
    assert fresh["dropped"] == pytest.approx(114 / 344, abs=1e-12)
    assert fresh["all_candidates"] == pytest.approx(230 / 688, abs=1e-12)
    trial = selection["trial"]
    assert set(trial) == {"selected", "kept_only", "unselected", "entropy_effect"}
    assert [(trial[name]["prompts"], trial[name]["steps"]) for name in
            ("selected", "kept_only", "unselected")] == [(5, 2), (4, 2), (4, 2)]
    assert trial["entropy_effect"] == pytest.approx(
        trial["selected"]["late_mean"] - trial["unselected"]["late_mean"])
    # The figure shows those numbers: a bar per step-0 overlap, a line per trial.
    _, bars, entropy = saved_figures["selection.png"].axes
    step0_sets = [step0["student_template"], step0["teacher_template"],
                  *step0["fresh_rollouts"].values()]
    assert [bar.get_height() for bar in bars.patches] == [v["overlap_ratio"] for v in step0_sets]
    assert [list(line.get_ydata()) for line in entropy.lines] == [
        trial[name]["student_entropy"] for name in ("selected", "kept_only", "unselected")]
    assert not (out / "trial" / "selected" / "checkpoints").exists()
    train = yaml.safe_load((out / "train.yaml").read_text())
    assert train["template"] == "{prompt}" and train["teacher_prompt"] == "student"
    assert (out / "selection.png").stat().st_size > 0 and "selected minus unselected" in (
        out / "report.md").read_text().lower()
    # The same out folder is refused.
    assert main(args) == 2
    assert "already holds a selection" in capsys.readouterr().err


def test_other_prompts_are_mixed_in_and_no_trial(tiny_pair, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"{a} + {a} =", "answer": str(2 * a)}) + "\n"
                             for a in range(6)))
    out = tmp_path / "sel"
    args = select_args(tiny_pair, out, "--other-prompts", str(other), "--mix-share", "0.5",
                       "--trial-steps", "0", "--template", "student")
    assert main(args) == 0
    selection = json.loads((out / "selection.json").read_text())
    assert selection["counts"]["mixed_in"] == 4 and selection["trial"] is None
    mixed = [r for r in load_prompts(out / "prompts.jsonl") if r.meta["selection"]["role"] == "mixed"]
    assert len(mixed) == 4 and all(r.messages[0]["content"].split(" + ")[0] ==
                                   r.messages[0]["content"].split(" + ")[1].split()[0] for r in mixed)


def test_missing_files_and_tokenizer_mismatch_are_explained(tiny_pair, tmp_path, capsys):
    args = select_args(tiny_pair, tmp_path / "a")
    args[args.index("--prompts") + 1] = str(tmp_path / "none.jsonl")
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(select_args(tiny_pair, tmp_path / "b", "--keep-fraction", "0")) == 2
    assert "keep_fraction must lie in (0, 1]" in capsys.readouterr().err
    other = make_model(tmp_path / "other", seed=3)
    vocab = json.loads((other / "tokenizer.json").read_text())
    vocab["model"]["vocab"] = {("zz" if t == "answer" else t): i for t, i in vocab["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    args = select_args(tiny_pair, tmp_path / "c")
    args[args.index("--teacher") + 1] = str(other)
    assert main(args) == 2
    assert "tokenizer mismatch" in capsys.readouterr().err
