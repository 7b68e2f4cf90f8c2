"""The Python API as a new user meets it: `import opd`, one function per verb, typed results,
settings as keywords, a mapping or a YAML file, and the CLI's one-line errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import yaml

import opd


def tiny(tiny_pair, out, **more):
    settings = {"student": str(tiny_pair["student"]), "teacher": str(tiny_pair["teacher"]),
                "prompts": str(tiny_pair["prompts"]), "out": str(out), "max_steps": 2,
                "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 6, "lr": 1e-3,
                "progress": False}
    return {**settings, **more}


def test_the_public_names_resolve_and_import_opd_stays_light():
    for name in opd.__all__:
        assert getattr(opd, name) is not None, name
    assert callable(opd.train) and callable(opd.diagnose) and callable(opd.evaluate)
    assert callable(opd.report) and callable(opd.reproduce)
    assert dataclasses.is_dataclass(opd.Diagnosis) and dataclasses.is_dataclass(opd.TrainResult)
    code = "import sys, opd; print('torch' in sys.modules, opd.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", opd.__version__]


def test_train_returns_a_typed_result(tiny_pair, tmp_path):
    result = opd.train(**tiny(tiny_pair, tmp_path / "a"), objective={"k": 4}, measure_k=4,
                       eval_prompts=str(tiny_pair["prompts"]), eval_temperature=0.0)
    assert isinstance(result, opd.TrainResult) and result.steps == 2
    assert result.run == tmp_path / "a" and result.model == tmp_path / "a" / "model"
    assert set(result.final_measures) >= {"loss", "overlap_ratio", "entropy_gap", "accuracy"}
    assert result.final_accuracy == result.final_measures["accuracy"]
    assert result.initial_accuracy is not None and result.stopped_early_at is None
    assert [r["step"] for r in result.metrics()] == [1, 2]
    assert result.config.objective.k == 4 and result.config.prompts_per_step == 2
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["steps"] == result.steps and result.summary["final_model"] == str(result.model)


def test_settings_come_as_keywords_a_mapping_or_a_yaml_file(tiny_pair, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**tiny(tiny_pair, tmp_path / "y"), "objective": {"k": 4},
                                    "profile": "cpu-small"}))
    from_yaml = opd.train(str(path), max_steps=1, **{"objective.k": 2})
    assert from_yaml.steps == 1 and from_yaml.config.objective.k == 2
    assert from_yaml.config.lr_schedule == "cosine"  # the YAML's profile
    grpo = opd.grpo({"student": str(tiny_pair["student"]), "prompts": str(tiny_pair["prompts"])},
                    out=str(tmp_path / "g"), max_steps=1, prompts_per_step=2,
                    samples_per_prompt=2, max_new_tokens=4, progress=False)
    assert grpo.config.distill_weight == 0 and grpo.config.outcome_weight == 1
    assert grpo.final_measures["train_reward"] is not None
    with pytest.raises(opd.OPDError, match="unknown key 'learning_rate'"):
        opd.train(**tiny(tiny_pair, tmp_path / "x"), learning_rate=1)
    with pytest.raises(opd.OPDError, match="config: lr must be positive"):
        opd.train(**tiny(tiny_pair, tmp_path / "x", lr=0))
    with pytest.raises(opd.OPDError, match="expected a TrainConfig, a mapping"):
        opd.train(42)
    assert not (tmp_path / "x").exists()


def test_evaluate_diagnose_and_report(tiny_pair, tmp_path, saved_figures):
    evaluation = opd.evaluate(str(tiny_pair["student"]), str(tiny_pair["prompts"]),
                              samples_per_prompt=2,
                              temperature=0.7, max_new_tokens=4)
    assert isinstance(evaluation, opd.EvalResult) and evaluation.n_prompts == 20
    assert 0 <= evaluation.accuracy <= 1 and len(evaluation.per_prompt) == 20

    settings = {"num_prompts": 4, "samples_per_prompt": 2, "max_new_tokens": 6, "depths": (0.0, 0.5),
                "k": (1, 4), "progress": False}
    diagnosis = opd.diagnose(tiny_pair["student"], tiny_pair["teacher"], tiny_pair["prompts"],
                             **settings)
    # Two random inits do not share a top-4: the first rule, the pattern check, fails.
    assert isinstance(diagnosis, opd.Diagnosis) and diagnosis.verdict == "pattern-mismatch"
    assert diagnosis.out is None and not (tmp_path / "diagnosis").exists()
    pattern = diagnosis.checks["pattern"]
    assert isinstance(pattern, opd.Check) and pattern.threshold == diagnosis.thresholds.min_overlap_share
    assert pattern.value < pattern.threshold and pattern.passed is False
    assert pattern.margin == pytest.approx(pattern.value - pattern.threshold)
    assert diagnosis.teacher.verdict == diagnosis.verdict and diagnosis.teacher2 is None
    assert diagnosis.cost.token_passes > 0 and diagnosis.cost.wall_seconds > 0
    assert 0 <= diagnosis.student_accuracy <= 1
    assert "verdict:" in diagnosis.table() and "pattern" in diagnosis.table()
    written = opd.diagnose(tiny_pair["student"], tiny_pair["teacher"], tiny_pair["prompts"],
                           out=tmp_path / "diag", **settings)
    assert written.out == tmp_path / "diag" and (tmp_path / "diag" / "diagnosis.json").exists()
    assert written.verdict == diagnosis.verdict  # seeded
    # A model against itself shares every top-k token, and from the same prefixes it can solve
    # nothing the student cannot (neither solves any sum): no novelty.
    twin = opd.diagnose(tiny_pair["student"], tiny_pair["student"], tiny_pair["prompts"],
                        **settings)
    assert twin.checks["pattern"].value == 1.0 and twin.checks["pattern"].passed
    assert twin.student_accuracy == 0.0 and twin.checks["novelty"].value == 0.0
    assert twin.verdict == "no-novelty"

    run = opd.train(**tiny(tiny_pair, tmp_path / "r", max_steps=2))
    saved_figures.clear()
    paths = opd.report(run.run, compare=tmp_path / "compare.png")
    assert paths == [run.run / "report.md", tmp_path / "compare.png"]
    # The figures show the metrics written: one line per panel, a column per step.
    records = run.metrics()
    panels = {ax.get_title(): ax for ax in saved_figures["compare.png"].axes}
    for key, title in (("overlap_ratio", "overlap ratio (top-k)"), ("grad_norm", "gradient norm"),
                       ("student_entropy", "student entropy")):
        (line,) = panels[title].lines
        assert list(line.get_xdata()) == [1, 2], title
        assert list(line.get_ydata()) == [r[key] for r in records], title
    heatmap = saved_figures["entropy_heatmap.png"].axes[0].images[0].get_array()
    by_position = [r["by_position"]["student_entropy"] for r in records]
    assert heatmap.tolist() == [list(column) for column in zip(*by_position, strict=True)]
    with pytest.raises(opd.OPDError, match="is not a run folder"):
        opd.report(tmp_path)
