"""End to end on tiny models: metrics, checkpoints, resume, GRPO, and the CLI."""

from __future__ import annotations

import json
import math

import pytest

from opd import metrics as M
from opd.cli import main
from opd.config.training import build_config
from opd.run.checkpoints import complete_checkpoints
from opd.run.loop import prompt_order, run_training
from opd.runtime import StepHook

load_metrics = M.read

EVERY_STEP = {m.name for m in M.SCHEMA.values() if m.present in {"every step", "with a teacher"}}
"""What the schema promises in every record of a run with a teacher."""


def tiny_config(tiny_pair, out, **overrides):
    settings = {
        "student": str(tiny_pair["student"]), "teacher": str(tiny_pair["teacher"]),
        "prompts": str(tiny_pair["prompts"]), "out": str(out), "max_steps": 6,
        "prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 8, "lr": 1e-3,
        "save_every": 2, "objective.k": 4, "measure_k": 4, "progress": False,
    }
    settings.update(overrides)
    return build_config(settings)


def without_times(records):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in records]


class KillAt(StepHook):
    """Interrupts the run at one step, after it is logged (as a kill between checkpoints)."""

    def __init__(self, step):
        self.step = step

    def on_step(self, record):
        if record["step"] == self.step:
            raise KeyboardInterrupt
        return False


def test_training_writes_metrics_checkpoints_and_summary(tiny_pair, tmp_path):
    config = tiny_config(tiny_pair, tmp_path / "run", eval_prompts=str(tiny_pair["prompts"]),
                         eval_every=3, eval_temperature=0.0)
    summary = run_training(config)
    records = load_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        assert EVERY_STEP <= set(record) <= set(M.SCHEMA)
        assert 0 <= record[M.OVERLAP_RATIO] <= 1
        assert set(record[M.BY_POSITION]) == set(M.TOKEN_MEASURES)
    assert [r["step"] for r in records if "accuracy" in r] == [3, 6]
    assert summary["initial_accuracy"] is not None
    checkpoints = complete_checkpoints(tmp_path / "run")
    assert [c.name for c in checkpoints] == ["step-000004", "step-000006"]  # keep 2
    for name in ("config.json", "optimizer.pt", "scheduler.pt", "rng.json", "trainer_state.json",
                 "run_config.yaml", "manifest.json"):
        assert (checkpoints[-1] / name).exists()
    assert records[0]["loss"] != records[-1]["loss"]


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


def test_lora_training_resumes_from_its_adapter_checkpoint(tiny_pair, tmp_path):
    whole = tiny_config(tiny_pair, tmp_path / "whole", lora_rank=4, max_steps=4)
    run_training(whole)
    checkpoint = complete_checkpoints(tmp_path / "whole")[-1]
    assert (checkpoint / "adapter_config.json").exists()  # adapters only, not the full model

    killed = tiny_config(tiny_pair, tmp_path / "killed", lora_rank=4, max_steps=4)
    with pytest.raises(KeyboardInterrupt):
        run_training(killed, hooks=[KillAt(3)])
    run_training(killed, resume=True)
    assert json.dumps(without_times(load_metrics(tmp_path / "killed"))) == json.dumps(
        without_times(load_metrics(tmp_path / "whole")))
