"""The cold-start recipe end to end on tiny models: kept, resumable stages, the gate before OPD
(random tiny models never pass it, so the runs that must reach OPD pass force), its report and
the data checks."""

from __future__ import annotations

import json

import pytest

from opd.cli import main
from opd.errors import OPDError
from opd.recipes.cold_start import ColdStartHandover, GateStopped, run_cold_start
from tests.conftest import make_tokenizer
from tests.support import COLD, tiny_config
from tests.tiny_models import DROPOUT, save_model


def test_cold_start_writes_each_stage_and_resumes(tiny_pair, tmp_path):
    out = tmp_path / "cold"
    config = tiny_config(tiny_pair, out, max_steps=2, cold_start=COLD)
    report = run_cold_start(config, force=True)
    rows = [json.loads(line) for line in (out / "teacher_data.jsonl").read_text().splitlines()]
    assert rows and {"messages", "response", "prompt_index"} <= set(rows[0])
    assert len({(r["prompt_index"], r["response"]) for r in rows}) == len(rows)  # deduplicated
    assert (out / "sft" / "config.json").exists()
    assert report["sft"]["cap"] == 3 and report["opd"]["steps"] == 2
    assert len(report["sft"]["train_losses"]) == report["sft"]["steps"] <= 3
    assert json.loads((out / "cold_start.json").read_text())["stages"]["sft"] == str(out / "sft")
    # A second call without --resume refuses; with it, finished stages are skipped.
    with pytest.raises(OPDError, match="already holds a cold-start run"):
        run_cold_start(config)
    before = (out / "teacher_data.jsonl").read_text()
    again = run_cold_start(tiny_config(tiny_pair, out, max_steps=3, cold_start=COLD), resume=True,
                           force=True)
    assert (out / "teacher_data.jsonl").read_text() == before
    assert again["opd"]["steps"] == 3


def test_keep_correct_needs_answers(tiny_pair, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1 + 2 ="}\n')
    config = tiny_config(tiny_pair, tmp_path / "cold", prompts=str(prompts),
                         cold_start={"keep": "correct"})
    with pytest.raises(OPDError, match=r"row 1 has no 'answer'; cold_start\.keep=correct needs"):
        run_cold_start(config)


def test_the_fine_tuning_keeps_dropout_unless_told_and_the_saved_model_keeps_its_config(
        tiny_pair, tmp_path):
    """`cold_start.sft_dropout` (on by default, as SFT usually runs) decides the fine-tuning's
    dropout; the on-policy stage switches it off either way; sft/ keeps GPT-2's own 0.1."""
    student = save_model(tmp_path / "gpt2", "gpt2", make_tokenizer(), seed=1, tied=True)
    first_loss = {}
    for keep in (True, False):
        out = tmp_path / f"cold-{keep}"
        config = tiny_config(tiny_pair, out, student=str(student), max_steps=1,
                             cold_start={**COLD, "sft_dropout": keep})
        report = run_cold_start(config, force=True)
        first_loss[keep] = report["sft"]["first_loss"]
        saved = json.loads((out / "sft" / "config.json").read_text())
        assert saved["attn_pdrop"] == saved["resid_pdrop"] == saved["embd_pdrop"] == DROPOUT
    assert first_loss[True] != first_loss[False]


def test_the_gate_stops_before_opd_with_its_numbers_and_force_goes_on(tiny_pair, tmp_path,
                                                                     saved_figures):
    """A starved fine-tuning (3 steps) leaves the student's pattern where it was: the gate
    stops with one line (numbers, next step), after writing the report; --resume --force
    reuses the fine-tuned student and the gate's measurement and runs OPD."""
    out = tmp_path / "cold"
    config = tiny_config(tiny_pair, out, max_steps=1, cold_start=COLD)
    with pytest.raises(GateStopped, match=r"^cold start stopped before OPD: .* overlap share with "
                       r"the teacher is 0\.\d\d \(needs ≥ 0\.50, top-4\).*next: raise "
                       r"cold_start\.sft_steps .*--force runs OPD anyway$") as stopped:
        run_cold_start(config)
    assert "\n" not in str(stopped.value)
    saved = json.loads((out / "cold_start.json").read_text())
    assert saved == stopped.value.report and saved["stopped"] == str(stopped.value)
    assert saved["gate"]["passed"] is False and not (out / "opd").exists()
    assert "Stopped before OPD" in (out / "report.md").read_text()
    assert (out / "sft_curves.png").exists()
    # The figure: the training loss by step, the validation losses, a mark at the kept step.
    train, validation, kept = saved_figures["sft_curves.png"].axes[0].lines
    losses = saved["sft"]["train_losses"]
    assert list(train.get_xdata()) == list(range(1, len(losses) + 1))
    assert list(train.get_ydata()) == losses
    assert [list(validation.get_xdata()), list(validation.get_ydata())] == [
        list(column) for column in zip(*saved["sft"]["validation_losses"], strict=True)]
    assert list(kept.get_xdata()) == [saved["sft"]["best_step"]] * 2
    sft_weights = (out / "sft" / "model.safetensors").stat().st_mtime_ns
    report = run_cold_start(config, resume=True, force=True)
    assert report["opd"]["steps"] == 1 and report["gate"] == saved["gate"] | {
        "accuracy": report["gate"]["accuracy"]}
    assert (out / "sft" / "model.safetensors").stat().st_mtime_ns == sft_weights
    assert report["stopped"] is None and "student_after_opd" in report["gate"]["accuracy"]
    assert "## OPD" in (out / "report.md").read_text()


def test_the_monitor_handover_records_the_gate_stop_instead_of_training(tiny_pair, tmp_path,
                                                                        capsys):
    config = tiny_config(tiny_pair, tmp_path / "run", on_failure="cold-start", cold_start=COLD)
    summary = {"alerts": [{"rule": "pattern-mismatch"}]}
    ColdStartHandover(config).on_end(summary)
    repair = tmp_path / "run" / "cold-start"
    assert summary["cold_start"]["stopped"].startswith("cold start stopped before OPD")
    assert not (repair / "opd").exists()
    assert "[cold start] cold start stopped before OPD" in capsys.readouterr().out


def test_too_few_prompts_are_named_up_front(tiny_pair, tmp_path, capsys):
    config = tiny_config(tiny_pair, tmp_path / "cold", max_steps=1,
                         cold_start={**COLD, "min_prompts": 50})
    report = run_cold_start(config, force=True)
    assert any("distinct training prompts (fewer than cold_start.min_prompts=50)" in w
               and "cold_start.prompts" in w for w in report["warnings"])
    assert "[cold start] teacher data: only" in capsys.readouterr().out


def test_the_verb_stops_with_one_line_and_exit_2_then_force_runs_opd(tiny_pair, tmp_path, capsys):
    out = tmp_path / "cold"
    argv = ["cold-start", "--student", str(tiny_pair["student"]), "--teacher",
            str(tiny_pair["teacher"]), "--prompts", str(tiny_pair["prompts"]), "--out", str(out),
            "--max-steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2",
            "--max-new-tokens", "4", "--set", "progress=false", "--set", "cold_start.keep=all",
            "--set", "cold_start.sft_steps=2"]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("opd ")]
    assert len(lines) == 1 and lines[0].startswith(
        "opd cold-start: error: cold start stopped before OPD: after SFT (step 2 of 2 run, cap 2)")
    assert main([*argv, "--resume", "--force"]) == 0
    assert json.loads((out / "cold_start.json").read_text())["opd"]["steps"] == 1


def test_the_python_function_raises_the_gate_as_an_opd_error_and_takes_force(tiny_pair, tmp_path):
    import opd

    config = tiny_config(tiny_pair, tmp_path / "cold", max_steps=1, cold_start=COLD)
    with pytest.raises(opd.OPDError, match="cold start stopped before OPD"):
        opd.cold_start(config=config)
    result = opd.cold_start(config=config, resume=True, force=True)
    assert result.opd.steps == 1 and result.report["gate"]["passed"] is False
    assert result.sft == tmp_path / "cold" / "sft"
