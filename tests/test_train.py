"""End to end on tiny models: metrics, checkpoints, resume, GRPO, and the CLI."""

from __future__ import annotations

import json
import math

import pytest

from opd import metrics as M
from opd.cli import main
from opd.errors import OPDError
from opd.run.folder import RunFolder
from opd.run.loop import prompt_order, run_training
from opd.runtime import StepHook
from tests.support import KillAt, tiny_config, without_times

load_metrics = M.read

EVERY_STEP = {m.name for m in M.SCHEMA.values() if m.present in {"every step", "with a teacher"}}
"""What the schema promises in every record of a run with a teacher."""


def test_training_writes_metrics_checkpoints_and_summary(tiny_pair, tmp_path):
    config = tiny_config(tiny_pair, tmp_path / "run", eval_prompts=str(tiny_pair["prompts"]),
                         eval_every=3, eval_temperature=0.0)
    summary = run_training(config)
    records = load_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        assert EVERY_STEP <= set(record) <= set(M.SCHEMA)
        # Mean of |I_t| / 4 over the step's 4 × 2 responses: a whole number of shared tokens.
        tokens = round(record[M.RESPONSE_LENGTH] * 8)
        shared = record[M.OVERLAP_RATIO] * 4 * tokens
        assert shared == pytest.approx(round(shared), abs=1e-6) and 0 <= shared <= 4 * tokens
        assert set(record[M.BY_POSITION]) == set(M.TOKEN_MEASURES)
    # Before the first update the run is tests/data/reference_metrics.json's "topk" run:
    # 80 of the 4 × 54 top-4 slots shared.
    assert records[0][M.RESPONSE_LENGTH] == 6.75
    assert records[0][M.OVERLAP_RATIO] == pytest.approx(80 / 216, abs=1e-12)
    assert [r["step"] for r in records if "accuracy" in r] == [3, 6]
    assert summary["initial_accuracy"] is not None
    checkpoints = RunFolder(tmp_path / "run").complete_checkpoints()
    assert [c.name for c in checkpoints] == ["step-000004", "step-000006"]  # keep 2
    for name in ("config.json", "optimizer.pt", "scheduler.pt", "rng.json", "trainer_state.json",
                 "run_config.yaml", "manifest.json"):
        assert (checkpoints[-1] / name).exists()
    assert records[0]["loss"] != records[-1]["loss"]


class StepsRun(StepHook):
    """Records the steps a run trains."""

    def __init__(self):
        self.steps = []

    def on_step(self, record):
        self.steps.append(record["step"])
        return False


def test_resume_auto_starts_a_new_run_then_continues_it(tiny_pair, tmp_path):
    out = tmp_path / "auto"
    argv = ["train", "--student", str(tiny_pair["student"]), "--teacher", str(tiny_pair["teacher"]),
            "--prompts", str(tiny_pair["prompts"]), "--out", str(out), "--max-steps", "2",
            "--prompts-per-step", "4", "--samples-per-prompt", "2", "--max-new-tokens", "8",
            "--save-every", "2", "--set", "objective.k=4", "--set", "measure_k=4",
            "--set", "progress=false", "--resume", "auto"]
    assert main(argv) == 0  # no run in --out yet: a new one
    assert [r["step"] for r in load_metrics(out)] == [1, 2]
    steps = StepsRun()
    run_training(tiny_config(tiny_pair, out, max_steps=4), resume="auto", hooks=[steps])
    assert steps.steps == [3, 4]  # continued from the checkpoint of step 2
    assert [r["step"] for r in load_metrics(out)] == [1, 2, 3, 4]


def test_resume_takes_only_true_false_or_auto(tiny_pair, tmp_path):
    with pytest.raises(OPDError, match="resume: must be false, true or 'auto', got 'yes'"):
        run_training(tiny_config(tiny_pair, tmp_path / "run"), resume="yes")
    assert not (tmp_path / "run").exists()


def test_killed_run_resumes_to_the_same_metrics(tiny_pair, tmp_path):
    run_training(tiny_config(tiny_pair, tmp_path / "whole"))

    with pytest.raises(KeyboardInterrupt):  # step 3 is logged, the last checkpoint is step 2
        run_training(tiny_config(tiny_pair, tmp_path / "killed"), hooks=[KillAt(4)])
    assert [r["step"] for r in load_metrics(tmp_path / "killed")] == [1, 2, 3]
    run_training(tiny_config(tiny_pair, tmp_path / "killed"), resume=True)
    whole = without_times(load_metrics(tmp_path / "whole"))
    resumed = without_times(load_metrics(tmp_path / "killed"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert json.dumps(resumed) == json.dumps(whole)


def test_grpo_is_the_same_loop_without_a_teacher(tiny_pair, tmp_path):
    config = tiny_config(tiny_pair, tmp_path / "grpo", teacher="", distill_weight=0.0,
                         outcome_weight=1.0, max_steps=2)
    run_training(config)
    record = load_metrics(tmp_path / "grpo")[-1]
    assert record["train_reward"] is not None
    assert record["overlap_ratio"] is None and record["student_entropy"] > 0


@pytest.mark.parametrize("objective", ["sampled", "subset_kl", "forward_kl"])
def test_other_objectives_and_options_run(tiny_pair, tmp_path, objective):
    config = tiny_config(tiny_pair, tmp_path / objective, max_steps=1, **{"objective.name": objective},
                         loss_aggregation="sequence-mean", kl_penalty=0.1, micro_batch=3,
                         teacher_prompt="own", chunk_size=5)
    run_training(config)
    (record,) = load_metrics(tmp_path / objective)
    assert math.isfinite(record["loss"]) and record["grad_norm"] > 0


def test_prompt_order_covers_each_epoch_once():
    order = prompt_order(5, seed=0, start=0, count=10)
    assert sorted(order[:5]) == sorted(order[5:]) == list(range(5))
    assert prompt_order(5, 0, 3, 4) == order[3:7]


def test_cli_trains_and_every_verb_has_help(tiny_pair, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["train", "--student", str(tiny_pair["student"]), "--teacher",
                 str(tiny_pair["teacher"]), "--prompts", str(tiny_pair["prompts"]), "--out",
                 str(out), "--max-steps", "2", "--prompts-per-step", "2",
                 "--samples-per-prompt", "2", "--max-new-tokens", "6",
                 "--set", "progress=false", "--set", "lr=1e-3"])
    assert code == 0
    assert len(load_metrics(out)) == 2
    grpo_out = tmp_path / "grpo"
    code = main(["grpo", "--student", str(tiny_pair["student"]), "--prompts",
                 str(tiny_pair["prompts"]), "--out", str(grpo_out), "--max-steps", "1",
                 "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "4",
                 "--set", "progress=false"])
    assert code == 0
    (record,) = load_metrics(grpo_out)
    assert record["train_reward"] is not None and record["overlap_ratio"] is None
    for verb in ("train", "grpo", "eval"):
        with pytest.raises(SystemExit) as exit_info:
            main([verb, "--help"])
        assert exit_info.value.code == 0
    assert "objective.strategy" in (main(["train", "--help-config"]) == 0 and capsys.readouterr().out)


@pytest.mark.filterwarnings("error::FutureWarning")  # no library deprecation reaches the user
def test_lora_training_resumes_from_its_adapter_checkpoint(tiny_pair, tmp_path):
    whole = tiny_config(tiny_pair, tmp_path / "whole", lora_rank=4, max_steps=4)
    run_training(whole)
    checkpoint = RunFolder(tmp_path / "whole").complete_checkpoints()[-1]
    assert (checkpoint / "adapter_config.json").exists()  # adapters only, not the full model

    killed = tiny_config(tiny_pair, tmp_path / "killed", lora_rank=4, max_steps=4)
    with pytest.raises(KeyboardInterrupt):
        run_training(killed, hooks=[KillAt(3)])
    run_training(killed, resume=True)
    assert json.dumps(without_times(load_metrics(tmp_path / "killed"))) == json.dumps(
        without_times(load_metrics(tmp_path / "whole")))
