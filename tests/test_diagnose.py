"""`opd diagnose`: pure rules against brute force, an end-to-end run on the tiny pair, and the
errors a user can meet."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import opd
from opd.cli import main
from opd.doctor.measure import DiagnoseConfig, _measures_at, _new_tokens, cut_at
from opd.doctor.progress import DiagnosisShape, WorkMeter, planned_passes
from opd.doctor.rules import Thresholds, auroc, clustered_mean_se, decide, horizon, mean_se
from opd.errors import OPDError
from opd.step.distributions import UNKNOWN_LOGPROB
from tests.conftest import TINY_WORDS, make_digit_tokenizer, make_model, make_tokenizer


def brute_auroc(scores, labels):
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_pairwise_count_with_ties(seed):
    rng = random.Random(seed)
    scores = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(40)]
    labels = [rng.random() < 0.4 for _ in scores]
    assert auroc(scores, labels) == pytest.approx(brute_auroc(scores, labels))


def test_auroc_extremes_and_one_class():
    assert auroc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert auroc([1, 2, 3, 4], [True, True, False, False]) == 0.0
    assert auroc([1, 2], [True, True]) is None


def test_mean_se_and_clustering():
    mean, se = mean_se([1.0, 2.0, 3.0])
    assert mean == 2.0 and se == pytest.approx(math.sqrt(1.0 / 3))
    assert mean_se([]) == (None, None) and mean_se([5.0]) == (5.0, 0.0)
    # Two clusters: the SE is that of the two cluster means, not of the four values.
    stats = clustered_mean_se([1.0, 1.0, 0.0, 0.0], [0, 0, 1, 1])
    assert stats["mean"] == 0.5 and stats["se"] == pytest.approx(0.5) and stats["clusters"] == 2


def point(depth, mean, se, fraction=None, tokens=0):
    return {"depth": depth, "tokens": tokens, "fraction": depth if fraction is None else fraction,
            "advantage": {"mean": mean, "se": se}}


def test_horizon_is_the_first_depth_where_the_advantage_is_not_significant():
    curve = [point(0, 0.4, 0.05), point(0.25, 0.3, 0.05), point(0.5, 0.08, 0.05), point(0.75, 0.0, 0.0)]
    assert horizon(curve, z=2.0)["depth"] == 0.5
    assert horizon(curve[:2], z=2.0) is None
    assert horizon([point(0, -0.1, 0.01)], z=2.0)["depth"] == 0


def summary(share=0.9, novelty=(0.3, 0.05), advantage=(0.2, 0.05), fraction=0.75, template=None):
    return {
        "overlap_share": share,
        "novelty": None if novelty is None else {"mean": novelty[0], "se": novelty[1]},
        "advantage": None if advantage is None else {"mean": advantage[0], "se": advantage[1]},
        "horizon_fraction": fraction,
        "template": template,
    }


@pytest.mark.parametrize(
    ("kwargs", "verdict"),
    [
        ({}, "go"),
        ({"fraction": None}, "go"),
        ({"share": 0.3}, "pattern-mismatch"),
        ({"share": 0.3, "novelty": (0.0, 0.01)}, "pattern-mismatch"),
        ({"novelty": (0.0, 0.02)}, "no-novelty"),
        ({"novelty": (0.04, 0.001)}, "no-novelty"),  # significant but below min_novelty
        ({"novelty": (0.2, 0.15)}, "no-novelty"),  # large but within noise
        ({"novelty": (None, None)}, "no-novelty"),  # the student solved every prompt
        ({"fraction": 0.25}, "horizon-risk"),
        ({"novelty": None, "advantage": None}, "go"),  # no answers: pattern only
    ],
)
def test_verdict_rules_on_hand_made_measures(kwargs, verdict):
    assert decide(summary(**kwargs), Thresholds()).verdict == verdict


def test_reverse_distillation_is_no_novelty_with_a_warning():
    decision = decide(summary(novelty=(0.0, 0.0), advantage=(-0.3, 0.05)), Thresholds())
    assert decision.verdict == "no-novelty"
    assert any("pull the student back" in w for w in decision.warnings)


def test_checks_record_value_threshold_and_margin():
    decision = decide(summary(share=0.8), Thresholds())
    pattern = decision.checks["pattern"]
    assert pattern["threshold"] == 0.5 and pattern["margin"] == pytest.approx(0.3)
    assert decision.checks["novelty"]["threshold"] == pytest.approx(0.1)  # z·SE above min_novelty


def test_template_check_fires_only_beyond_noise_and_minimum():
    fires = {"applies": True, "gap": 0.5, "se": 0.05}
    noisy = {"applies": True, "gap": 0.5, "se": 0.3}
    tiny = {"applies": True, "gap": 0.03, "se": 0.001}
    for template, expected in ((fires, True), (noisy, False), (tiny, False)):
        decision = decide(summary(template=template), Thresholds())
        assert (decision.checks["template"]["passed"] is False) == expected
        assert any("own template" in a for a in decision.advice) == expected


def test_depths_and_cuts():
    assert DiagnoseConfig(depths="0, 0.25,0.5,8").depths == (0.0, 0.25, 0.5, 8.0)
    for bad, message in (("a,b", "depths must be a comma-separated list of float"),
                         ("0.5,0.25", "depths must be increasing"),
                         ("-1", "depths must be at least 0")):
        with pytest.raises(OPDError, match=message):
            DiagnoseConfig(depths=bad)
    assert cut_at(0.5, 10) == 5 and cut_at(0.0, 10) == 0
    assert cut_at(4, 10) == 4 and cut_at(12, 10) is None


def diagnose_args(tiny_pair, out, *extra):
    return ["diagnose", "--student", str(tiny_pair["student"]), "--teacher", str(tiny_pair["teacher"]),
            "--prompts", str(tiny_pair["prompts"]), "--out", str(out), "--num-prompts", "6",
            "--samples-per-prompt", "2", "--max-new-tokens", "6", "--no-progress", *extra]


def test_end_to_end_on_the_tiny_pair_writes_json_report_and_figures(tiny_pair, tmp_path, capsys,
                                                                   saved_figures):
    out = tmp_path / "diag"
    assert main(diagnose_args(tiny_pair, out, "--teacher2", str(tiny_pair["student"]))) == 0
    printed = capsys.readouterr().out
    diagnosis = json.loads((out / "diagnosis.json").read_text())
    # Two unrelated random models: below the pattern threshold, and the verdict says so.
    pattern = diagnosis["teacher"]["decision"]["checks"]["pattern"]
    assert pattern["value"] < pattern["threshold"] and pattern["passed"] is False
    assert diagnosis["verdict"] == "pattern-mismatch"
    assert diagnosis["verdict"] in printed and "cost:" in printed
    for name in ("report.md", "overlap_by_position.png", "continuation_by_depth.png",
                 "reward_distributions.png"):
        assert (out / name).stat().st_size > 0
    assert not list(out.glob(".*tmp*"))
    teacher, twin = diagnosis["teacher"], diagnosis["teacher2"]
    assert set(teacher["pattern"]["by_k"]) == {"1", "4", "16"}
    assert len(teacher["continuation"]) == 4 and teacher["template"]["identical"]
    # The student as its own second teacher: full overlap, identical continuations (same seeds).
    assert twin["pattern"]["by_k"]["4"]["overall"]["overlap_share_teacher"] == pytest.approx(1.0)
    assert all(p["advantage"]["mean"] == 0 for p in twin["continuation"])
    assert twin["decision"]["verdict"] == "no-novelty"
    # The overlap figure draws both teachers' top-4 curves by position from diagnosis.json.
    ratio, share = saved_figures["overlap_by_position.png"].axes
    blocks = [t["pattern"]["by_k"]["4"]["by_position"] for t in (teacher, twin)]
    assert [list(line.get_xdata()) for line in ratio.lines] == [teacher["pattern"]["bin_edges"]] * 2
    assert [list(line.get_ydata()) for line in ratio.lines] == [b["overlap_ratio"] for b in blocks]
    assert [list(line.get_ydata()) for line in share.lines[:4]] == [
        b[side] for b in blocks for side in ("overlap_share_student", "overlap_share_teacher")]
    cost = diagnosis["cost"]
    assert cost["student_rollouts"] == 12 and cost["wall_seconds"] > 0
    assert 0 < cost["percent_of_training_run"] < 100
    assert "# OPD diagnosis" in (out / "report.md").read_text()


def test_template_check_compares_the_teachers_own_template(tiny_pair, tmp_path):
    out = tmp_path / "diag"
    assert main(diagnose_args(tiny_pair, out, "--teacher-template", "a b {prompt}",
                              "--depths", "0")) == 0
    template = json.loads((out / "diagnosis.json").read_text())["teacher"]["template"]
    assert not template["identical"] and template["applies"]
    assert template["example_own"].startswith("<bos> a b") and math.isfinite(template["gap"])


def test_prompts_without_answers_skip_the_accuracy_checks(tiny_pair, tmp_path, capsys):
    prompts = tmp_path / "no-answers.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a} + 1 ="}) + "\n" for a in range(4)))
    args = diagnose_args(tiny_pair, tmp_path / "diag")
    args[args.index("--prompts") + 1] = str(prompts)
    assert main(args) == 0
    diagnosis = json.loads((tmp_path / "diag" / "diagnosis.json").read_text())
    assert diagnosis["teacher"]["continuation"] is None
    assert any("no 'answer'" in w for w in diagnosis["warnings"])
    assert "novelty" not in diagnosis["teacher"]["decision"]["checks"]


def test_missing_teacher_and_prompts_are_explained(tiny_pair, tmp_path, capsys):
    args = diagnose_args(tiny_pair, tmp_path / "diag")
    del args[args.index("--teacher") : args.index("--teacher") + 2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "teacher: no model given; pass --teacher" in err and "Traceback" not in err
    args = diagnose_args(tiny_pair, tmp_path / "diag")
    del args[args.index("--prompts") : args.index("--prompts") + 2]
    assert main(args) == 2
    assert "pass --prompts" in capsys.readouterr().err
    assert not (tmp_path / "diag").exists()


def test_tokenizer_mismatch_stops_before_measuring(tiny_pair, tmp_path, capsys):
    other = make_model(tmp_path / "other", seed=3)
    vocab_file = json.loads((other / "tokenizer.json").read_text())
    vocab = vocab_file["model"]["vocab"]
    vocab["zebra"], vocab["answer"] = vocab.pop("answer"), len(vocab)
    (other / "tokenizer.json").write_text(json.dumps(vocab_file))
    args = diagnose_args(tiny_pair, tmp_path / "diag")
    args[args.index("--teacher") + 1] = str(other)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "tokenizer mismatch" in err and "'answer' vs 'zebra'" in err
    assert "diagnose across tokenizers with --cross-tokenizer" in err
    assert not (tmp_path / "diag").exists()


@pytest.mark.parametrize("extra", [
    (),  # one teacher, answers: rollouts, continuations, the teacher's own attempts, scoring
    ("--teacher-template", "a b {prompt}", "--depths", "0,3"),  # a template check to score
    ("--teacher2", "STUDENT"),  # a second teacher and the teacher-vs-teacher2 pass
])
def test_the_progress_bar_ends_at_its_plan_and_estimates_up_front(tiny_pair, tmp_path, capfd,
                                                                  monkeypatch, extra):
    """The plan made once the student's rollouts are in is the work done, token pass for token
    pass; the estimate comes after the first decode steps, long before the end."""
    ends = []
    monkeypatch.setattr(WorkMeter, "close", lambda meter: ends.append((meter.bar.n, meter.bar.total)))
    args = [a for a in diagnose_args(tiny_pair, tmp_path / "diag") if a != "--no-progress"]
    extra = [str(tiny_pair["student"]) if a == "STUDENT" else a for a in extra]
    assert main([*args, *extra]) == 0
    (done, planned), = ends
    assert done == planned > 0
    cost = json.loads((tmp_path / "diag" / "diagnosis.json").read_text())["cost"]
    assert cost["planned_token_passes"] == planned >= cost["token_passes"]
    assert cost["estimated_seconds"] > 0
    assert "opd diagnose: about " in capfd.readouterr().err


def test_the_first_plan_is_an_upper_bound_of_the_work():
    shape = DiagnosisShape(rollouts=8, max_new_tokens=10, depths=2, teachers=1, answers=True,
                           template_checks=1)
    # The student's rollouts and continuations, the teacher's attempts and continuations, and
    # two scoring passes (pattern, template) of two models over every response token.
    assert planned_passes(shape) == 80 + 160 + 80 + 160 + 2 * 2 * 80
    assert planned_passes(shape, response_tokens=40, continuation_steps=50) == 80 + 50 + 80 + 50 + 160
    silent = DiagnosisShape(rollouts=8, max_new_tokens=10, depths=2, teachers=1, answers=False,
                            template_checks=0)
    assert planned_passes(silent) == 80 + 2 * 80


def test_a_long_estimate_says_what_shortens_it(monkeypatch, capsys):
    clock = iter(range(100))  # one second per decode step
    monkeypatch.setattr("opd.doctor.progress.time.perf_counter", lambda: next(clock))
    meter = WorkMeter(1_000_000)
    for _ in range(16):
        meter.decoded(64)
    meter.close()
    err = capsys.readouterr().err
    # 15 timed steps of 64 rows in 15 s: 64 passes/s, so the million take about 4.3 h.
    assert meter.estimate_seconds == pytest.approx((1_000_000 - 16 * 64) / 64 + 15)
    assert "opd diagnose: about 4.3 h (1,000,000 token passes at 64/s" in err
    assert "a shorter --max-new-tokens" in err


SPECIAL_LOGIT = -30.0
"""What the twin test's student gives `<pad>`, `<bos>` and `<unk>` (`_never_special`)."""


def _never_special(model) -> None:
    """Make a tiny tied Llama never sample `<pad>`, `<bos>` or `<unk>` (ids 0, 1, 3): its
    residual dimension 0 is held at 1 (no layer writes to it; every other token's embedding
    has 1 there), and those three rows have SPECIAL_LOGIT there. A special token would vanish
    from the response's text, and the teacher's context with it."""
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[:, 0] = 1.0
        embedding[[0, 1, 3], 0] = SPECIAL_LOGIT
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A student, its twin (the same model behind another vocabulary of the same text: the
    words' ids reversed, the embedding rows moved with them) and prompts whose answer is the
    student's greedy response, so that continuing from the prompt solves every one."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("twins")
    student = make_model(root / "student", seed=4)
    model = AutoModelForCausalLM.from_pretrained(student)
    _never_special(model)
    model.save_pretrained(student)
    rows = []
    for prompt in [f"{a} + {b} =" for a in range(3) for b in range(2)]:
        ids = make_tokenizer()(prompt, add_special_tokens=False)["input_ids"]
        greedy = model.generate(torch.tensor([[1, *ids]]), do_sample=False, max_new_tokens=6,
                                eos_token_id=2, pad_token_id=0)[0, len(ids) + 1:]
        answer = make_tokenizer().decode(greedy, skip_special_tokens=True)
        rows.append({"prompt": prompt, "answer": answer})
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    words = make_tokenizer().get_vocab()
    tokenizer = make_tokenizer(TINY_WORDS[::-1])
    order = [words[tokenizer.convert_ids_to_tokens(i)] for i in range(len(tokenizer))]
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding.copy_(embedding[order])
    model.save_pretrained(root / "twin")
    tokenizer.save_pretrained(root / "twin")
    return student, root / "twin", root / "prompts.jsonl"


def test_across_tokenizers_a_twin_gives_the_ideal_values_at_aligned_positions(twins, tmp_path):
    student, twin, prompts = twins
    out = tmp_path / "diag"
    diagnosis = opd.diagnose(str(student), str(twin), str(prompts), out=out,
                             cross_tokenizer=True, num_prompts=6, samples_per_prompt=2,
                             max_new_tokens=6, temperature=0.0, progress=False)
    across = diagnosis.teacher.across_tokenizers
    # Every word and the EOS pair up, and one word on each side is every span.
    assert across["shared_vocabulary"] == across["student_vocabulary"] == len(make_tokenizer())
    assert across["aligned_share"] == 1.0
    assert across["measures"]["pattern"].startswith("approximate")
    for k, block in diagnosis.data["teacher"]["pattern"]["by_k"].items():
        values = block["overall"]
        assert values["aligned_share"] == 1.0
        assert values["overlap_ratio"] == pytest.approx(1.0), k
        assert values["overlap_share_student"] == pytest.approx(1.0)
        assert values["overlap_share_teacher"] == pytest.approx(1.0)
        assert values["overlap_mass_student"] == pytest.approx(values["overlap_mass_teacher"],
                                                               abs=1e-5)
        assert values["overlap_token_advantage"] == pytest.approx(0.0, abs=1e-5)
        assert values["entropy_gap"] == pytest.approx(0.0, abs=1e-4)
        assert values["reverse_kl"] == pytest.approx(0.0, abs=1e-5)
    # Greedy rollouts, and greedy continuations of their text by the same model: every
    # prompt solved at every depth (the answers are the student's own greedy responses).
    continuation = diagnosis.data["teacher"]["continuation"]
    assert [(p["teacher_accuracy"], p["student_accuracy"]) for p in continuation] == [(1, 1)] * 4
    assert diagnosis.teacher.accuracy_own_template == 1.0
    assert diagnosis.verdict == "no-novelty" and diagnosis.student_accuracy == 1.0
    assert not diagnosis.data["teacher"]["template"]["applies"]
    assert any("another tokenizer" in w and "100%" in w for w in diagnosis.warnings)
    report = (out / "report.md").read_text()
    assert "## Across tokenizers" in report and "not applicable" in report


def test_across_tokenizers_only_aligned_positions_are_measured(tiny_pair, digit_teacher,
                                                              tmp_path):
    args = diagnose_args(tiny_pair, tmp_path / "diag", "--cross-tokenizer", "--depths", "0")
    args[args.index("--teacher") + 1] = str(digit_teacher)
    assert main(args) == 0
    teacher = json.loads((tmp_path / "diag" / "diagnosis.json").read_text())["teacher"]
    across = teacher["across_tokenizers"]
    # All but 10–19 (two tokens there), `1` (the teacher's `1` starts `1 ##2`, so holds the
    # mass of the student's `12`) and `<bos>` (`<s>` there).
    assert across["shared_vocabulary"] == len(make_tokenizer()) - 12
    assert 0 < across["aligned_share"] < 1
    for block in teacher["pattern"]["by_k"].values():
        assert all(math.isfinite(v) for v in block["overall"].values())
    assert all(math.isfinite(r) for r in teacher["sequence_reward"])
    assert teacher["decision"]["verdict"] == "pattern-mismatch"  # two unrelated random models
    assert not any("teacher_prompt: own" in a for a in teacher["decision"]["advice"])


@pytest.mark.parametrize(("extra", "message"), [
    (("--teacher", "http://127.0.0.1:9"), "cross_tokenizer: teacher is served"),
    (("--teacher2", "STUDENT"), "cross_tokenizer: teacher2 is compared with teacher"),
])
def test_across_tokenizers_what_cannot_be_measured_is_refused(tiny_pair, tmp_path, capsys,
                                                              extra, message):
    extra = [str(tiny_pair["student"]) if a == "STUDENT" else a for a in extra]
    assert main([*diagnose_args(tiny_pair, tmp_path / "diag", "--cross-tokenizer"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "diag").exists()


def test_across_tokenizers_each_sides_share_is_of_its_top_k_among_the_paired_tokens():
    # Paired tokens 1, 4, 6 at an aligned position, k = 4: the student's most likely tokens
    # 0, 2, 3 have no counterpart, so its top-4 mass is that of 1, 4, 6, all shared.
    student = torch.tensor([[0.0, -9.0, 0.0, 0.0, -1.0, -9.0, -2.0, -9.0]]).log_softmax(-1)
    teacher = torch.full((1, 8), UNKNOWN_LOGPROB)
    teacher[0, [1, 4, 6]] = torch.tensor([-0.3, -2.0, -1.6])
    values = _measures_at([4])(student, teacher, torch.tensor([4]),
                              teacher_entropy=torch.ones(1), aligned=torch.tensor([True]))
    assert values["overlap_share_student@4"].item() == pytest.approx(1.0)
    assert values["overlap_share_teacher@4"].item() == pytest.approx(1.0)
    assert values["overlap_mass_student@4"].item() == pytest.approx(
        float(student[0, [1, 4, 6]].exp().sum()), rel=1e-6)


def test_across_tokenizers_the_teachers_budget_is_in_its_own_tokens():
    student_tok, teacher_tok = make_tokenizer(), make_digit_tokenizer()
    # 6 + 4 student tokens; the teacher writes `12` as `1 ##2`: 8 + 3 (the EOS is no text).
    rows = [student_tok(text, add_special_tokens=False)["input_ids"] + [2]
            for text in ("12 + 15 = 18", "3 answer 3")]
    ctx = SimpleNamespace(config=SimpleNamespace(max_new_tokens=10),
                          student=SimpleNamespace(tokenizer=student_tok),
                          rollouts=SimpleNamespace(response_ids=rows))
    across = SimpleNamespace(aligner=object(), tokenizer=teacher_tok)
    assert _new_tokens(across, ctx) == math.ceil(10 * 11 / 10) == 11
    assert _new_tokens(SimpleNamespace(aligner=None, tokenizer=teacher_tok), ctx) == 10
    ctx.config.max_new_tokens = 30
    assert _new_tokens(across, ctx) == 33


def test_teacher_share_is_the_part_of_the_gain_a_control_does_not_reproduce():
    from opd.doctor.control import summarise, teacher_share

    assert teacher_share(0.4, 0.1) == pytest.approx(0.75)
    assert teacher_share(0.4, 0.5) == pytest.approx(-0.25)  # the control does better
    assert teacher_share(0.0, 0.1) is None and teacher_share(-0.1, -0.3) is None
    found = summarise(0.2, {"none": 0.6, "constant": 0.3, "shuffled": 0.2})
    assert found["gain"] == pytest.approx({"none": 0.4, "constant": 0.1, "shuffled": 0.0})
    assert found["teacher_share"] == pytest.approx({"constant": 0.75, "shuffled": 1.0})


def test_control_trains_with_each_signal_and_reports_the_gains(tiny_pair, tmp_path, monkeypatch):
    # Three real short runs on the tiny pair; each run's objective.control is recorded on its
    # way to the trainer, and the accuracies are those of the trained checkpoints.
    from opd import api
    from opd.run import loop

    controls, checkpoints = [], []
    real_run = loop.run_training

    def recording_run(config, **kwargs):
        controls.append(config.objective.control)
        summary = real_run(config, **kwargs)
        checkpoints.append(summary["final_checkpoint"])
        return summary

    monkeypatch.setattr(loop, "run_training", recording_run)
    monkeypatch.setattr("opd.doctor.measure.student_accuracy", lambda path, records, config: float(
        path in checkpoints and checkpoints.index(path) + 1) / 10)
    diagnosis = api.diagnose(str(tiny_pair["student"]), str(tiny_pair["teacher"]),
                             str(tiny_pair["prompts"]), out=tmp_path / "diag", num_prompts=6,
                             samples_per_prompt=2, max_new_tokens=6, progress=False,
                             control=True, control_steps=2)
    assert controls == ["none", "constant", "shuffled"]
    control = diagnosis.control
    assert control["accuracy_after"] == pytest.approx({"none": 0.1, "constant": 0.2,
                                                       "shuffled": 0.3})
    assert control["accuracy_before"] == 0.0 and control["steps"] == 2
    assert control["teacher_share"] == pytest.approx({"constant": -1.0, "shuffled": -2.0})
    saved = json.loads((tmp_path / "diag" / "diagnosis.json").read_text())
    assert saved["control"] == control and saved["cost"]["stage_seconds"]["control"] > 0
    assert "## Does the teacher matter?" in (tmp_path / "diag" / "report.md").read_text()


def test_control_refuses_a_served_teacher(tiny_pair):
    with pytest.raises(OPDError, match="control: the control runs need the teacher's whole"):
        DiagnoseConfig(student=str(tiny_pair["student"]), teacher="http://localhost:1",
                       prompts="p", control=True)


def test_control_refuses_a_teacher_of_another_tokenizer(tiny_pair):
    with pytest.raises(OPDError, match="control: the control runs train with the teacher's "
                       "log-probs on the student's vocabulary"):
        DiagnoseConfig(student=str(tiny_pair["student"]), teacher=str(tiny_pair["teacher"]),
                       prompts="p", control=True, cross_tokenizer=True)
