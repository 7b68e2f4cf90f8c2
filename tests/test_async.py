"""Rollouts ahead of the update (`max_staleness`): the settings, the fixed staleness schedule,
S = 0 equal to the synchronous loop, the worker's batches equal to a synchronous sample by the
same weights, exact resume with rollouts in flight, a failing worker, and the staleness meter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from opd import metrics as M
from opd.cli import main
from opd.config.training import build_config, stale_loss_of
from opd.errors import OPDError
from opd.run.ahead import AheadBatch, RolloutWorker, staleness_bias
from opd.run.checkpoints import load_in_flight
from opd.run.folder import RunFolder
from opd.run.loop import Trainer, run_training
from tests.support import KillAt, tiny_config, without_times

AHEAD = {"max_steps": 4, "save_every": 2}
"""4 steps of the tiny run, a checkpoint every second."""


def final_weights(out) -> dict[str, torch.Tensor]:
    return load_file(RunFolder(out).complete_checkpoints()[-1] / "model.safetensors")


# -- settings ---------------------------------------------------------------------------------
def test_the_staleness_settings_are_checked_with_the_fix_named():
    with pytest.raises(OPDError, match=r"max_staleness.*must be"):
        build_config({"max_staleness": -1})
    with pytest.raises(OPDError, match=r"max_staleness: .*rollout_engine=hf"):
        build_config({"max_staleness": 2, "rollout_engine": "vllm"})
    with pytest.raises(OPDError, match=r"stale_loss: tis .*forward_kl.*set tis_cap"):
        build_config({"max_staleness": 1, "objective": {"name": "forward_kl"}})
    with pytest.raises(OPDError, match="tis_cap needs rollout_engine=vllm or max_staleness"):
        build_config({"tis_cap": 2.0})
    assert stale_loss_of(build_config({"max_staleness": 1})) == "recompute"  # topk: reverse KL
    forward = build_config({"max_staleness": 1, "tis_cap": 2.0,
                            "objective": {"name": "forward_kl"}})
    assert stale_loss_of(forward) == "tis"
    assert stale_loss_of(build_config({"stale_loss": "tis", "max_staleness": 1,
                                       "tis_cap": 2.0})) == "tis"


def test_step_t_is_sampled_by_the_weights_after_update_t_minus_1_minus_s():
    student = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(0.0)
    worker = RolloutWorker(student, lambda model, step: (float(model.weight), None),
                           max_staleness=2, max_steps=6)
    worker.start(1, {})
    batches = []
    for step in range(1, 7):
        batches.append(worker.take(step))
        with torch.no_grad():
            student.weight.fill_(float(step))  # "update" number `step`
        worker.push(step, student)
    worker.close()
    assert [(b.step, b.version, b.rollouts) for b in batches] == [
        (1, 0, 0.0), (2, 0, 0.0), (3, 0, 0.0), (4, 1, 1.0), (5, 2, 2.0), (6, 3, 3.0)]


def test_the_meter_of_identical_gradients_is_one_and_of_opposite_ones_minus_one():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0]])]
    same = staleness_bias(1.5, 1.5, grads, [g.clone() for g in grads])
    assert same == {M.STALENESS_LOSS_BIAS: 0.0, M.STALENESS_GRAD_COSINE: pytest.approx(1.0),
                    M.STALENESS_GRAD_NORM_RATIO: pytest.approx(1.0)}
    other = staleness_bias(2.0, 1.5, grads, [-2 * g for g in grads])
    assert other[M.STALENESS_LOSS_BIAS] == 0.5
    assert other[M.STALENESS_GRAD_COSINE] == pytest.approx(-1.0)
    assert other[M.STALENESS_GRAD_NORM_RATIO] == pytest.approx(0.5)


# -- runs -------------------------------------------------------------------------------------
def test_staleness_zero_is_the_synchronous_loop(tiny_pair, tmp_path):
    run_training(tiny_config(tiny_pair, tmp_path / "sync", **AHEAD))
    run_training(tiny_config(tiny_pair, tmp_path / "zero", max_staleness=0,
                             staleness_meter_every=2, **AHEAD))
    sync = without_times(M.read(tmp_path / "sync"))
    zero = without_times(M.read(tmp_path / "zero"))
    assert [r[M.STALENESS] for r in sync] == [0, 0, 0, 0]
    meters = [r.pop(M.STALENESS_GRAD_COSINE) for r in zero if M.STALENESS_GRAD_COSINE in r]
    assert meters == [pytest.approx(1.0, abs=1e-6)] * 2  # steps 2 and 4: fresh == stale
    for r in zero:
        if M.STALENESS_LOSS_BIAS in r:
            assert r.pop(M.STALENESS_LOSS_BIAS) == 0.0
            assert r.pop(M.STALENESS_GRAD_NORM_RATIO) == pytest.approx(1.0, abs=1e-6)
    assert json.dumps(zero) == json.dumps(sync)  # the meter changes nothing it does not log
    for name, weight in final_weights(tmp_path / "sync").items():
        assert torch.equal(weight, final_weights(tmp_path / "zero")[name]), name


def test_rollouts_ahead_record_their_staleness_and_resume_exactly(tiny_pair, tmp_path):
    ahead = {**AHEAD, "max_staleness": 2, "staleness_meter_every": 3}
    run_training(tiny_config(tiny_pair, tmp_path / "sync", **AHEAD))
    run_training(tiny_config(tiny_pair, tmp_path / "whole", **ahead))
    whole = without_times(M.read(tmp_path / "whole"))
    sync = without_times(M.read(tmp_path / "sync"))
    assert [r[M.STALENESS] for r in whole] == [0, 1, 2, 2]
    assert json.dumps(whole[0]) == json.dumps(sync[0])  # step 1: the same weights sampled
    assert whole[1][M.LOSS] != sync[1][M.LOSS]  # step 2: sampled before update 1
    meter = whole[2]  # step 3, two updates stale: the gradient turned, but not around
    assert 0 < meter[M.STALENESS_GRAD_COSINE] < 0.9999 and meter[M.STALENESS_LOSS_BIAS] != 0
    run_training(tiny_config(tiny_pair, tmp_path / "unmetered", **AHEAD, max_staleness=2))
    metered = [{k: v for k, v in r.items() if not k.startswith("staleness_")} for r in whole]
    assert json.dumps(metered) == json.dumps(without_times(M.read(tmp_path / "unmetered")))

    with pytest.raises(KeyboardInterrupt):  # step 3 is logged, the last checkpoint is step 2
        run_training(tiny_config(tiny_pair, tmp_path / "killed", **ahead), hooks=[KillAt(3)])
    in_flight = load_in_flight(RunFolder(tmp_path / "killed").checkpoint(2))
    assert {s: b["version"] for s, b in in_flight.items()} == {3: 0, 4: 1}
    run_training(tiny_config(tiny_pair, tmp_path / "killed", **ahead), resume=True)
    assert json.dumps(without_times(M.read(tmp_path / "killed"))) == json.dumps(whole)
    for name, weight in final_weights(tmp_path / "whole").items():
        assert torch.equal(weight, final_weights(tmp_path / "killed")[name]), name


def test_the_workers_batches_are_what_their_weights_sample(tiny_pair, tmp_path):
    """Step 4's batch, sampled ahead by the weights after update 2 (S = 1), equals what the
    synchronous sampler draws for step 4 from checkpoint 2's weights."""
    out = tmp_path / "ahead"
    run_training(tiny_config(tiny_pair, out, max_steps=4, save_every=1, keep_checkpoints=4,
                             max_staleness=1))
    saved = AheadBatch.from_saved(load_in_flight(RunFolder(out).checkpoint(3))[4])
    assert saved.version == 2
    replay = Trainer(tiny_config(tiny_pair, tmp_path / "replay",
                                 student=str(RunFolder(out).checkpoint(2)), max_steps=4))
    rollouts = replay.sample(4, replay._step_prompts(4))
    assert rollouts.response_ids == saved.rollouts.response_ids
    assert torch.equal(rollouts.input_ids, saved.rollouts.input_ids)


def test_a_failing_worker_stops_the_run_with_one_line_and_resume_continues(
        tiny_pair, tmp_path, monkeypatch):
    config = tiny_config(tiny_pair, tmp_path / "run", **AHEAD, max_staleness=1)
    sample = Trainer.sample

    def failing(self, step, indices, model=None, tokenizer=None):
        if step == 4 and model is not None:
            raise RuntimeError("CUDA error: an illegal memory access\nwas encountered")
        return sample(self, step, indices, model, tokenizer)

    monkeypatch.setattr(Trainer, "sample", failing)
    with pytest.raises(OPDError) as caught:
        run_training(config)
    message = str(caught.value)
    assert "\n" not in message
    assert "failed sampling step 4 (RuntimeError: CUDA error: an illegal memory access was" in message
    assert [r[M.STEP] for r in M.read(tmp_path / "run")] == [1, 2, 3]  # nothing of step 4
    folder = RunFolder(tmp_path / "run")
    assert folder.complete_checkpoints() == [folder.checkpoint(2)]
    assert not list(folder.checkpoint(2).parent.glob("*.tmp"))
    monkeypatch.setattr(Trainer, "sample", sample)
    run_training(config, resume=True)
    run_training(tiny_config(tiny_pair, tmp_path / "whole", **AHEAD, max_staleness=1))
    assert json.dumps(without_times(M.read(tmp_path / "run"))) == json.dumps(
        without_times(M.read(tmp_path / "whole")))


def test_the_worker_receives_only_the_trained_weights_and_samples_with_them():
    """A frozen base and a trained adapter (LoRA's shape): a push copies the adapter alone, and
    the worker's copy then equals the student, frozen weights included."""
    student = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    student[0].requires_grad_(False)
    pushed = []
    worker = RolloutWorker(student, lambda model, step: (
        [p.clone() for p in model.parameters()], None), max_staleness=1, max_steps=3)
    worker.jobs.put = lambda job, put=worker.jobs.put: (pushed.append(job), put(job))[1]
    worker.start(1, {})
    with torch.no_grad():
        student[1].weight.add_(1.0)
    worker.push(1, student)
    third = [worker.take(step) for step in (1, 2, 3)][-1]
    worker.close()
    (weights,) = [job[2] for job in pushed if job is not None and job[2] is not None]
    assert set(weights) == {"1.weight", "1.bias"}
    assert all(torch.equal(seen, p) for seen, p in zip(third.rollouts, student.parameters(),
                                                      strict=True))


def test_a_worker_that_dies_is_reported_and_missing_batches_are_sampled_fresh():
    model = torch.nn.Linear(2, 2)
    worker = RolloutWorker(model, lambda m, step: (_ for _ in ()).throw(SystemExit(3)),
                           max_staleness=1, max_steps=3)
    worker.start(1, {})
    with pytest.raises(OPDError, match=r"failed sampling step 1 \(SystemExit: 3\)"):
        worker.take(1)
    worker.close()
    # resumed at step 5 with only step 5's batch kept: 6 and 7 come from version 4, less stale
    kept = AheadBatch(5, 2, "rollouts of step 5")
    resumed = RolloutWorker(model, lambda m, step: (f"rollouts of step {step}", None),
                            max_staleness=2, max_steps=9)
    resumed.start(5, {5: kept})
    assert [resumed.take(s) for s in (5, 6, 7)] == [
        kept, AheadBatch(6, 4, "rollouts of step 6"), AheadBatch(7, 4, "rollouts of step 7")]
    resumed.close()


def test_tis_weighs_stale_tokens_by_the_sampler_and_recompute_does_not(tiny_pair, tmp_path):
    for mode in ("recompute", "tis"):
        run_training(tiny_config(tiny_pair, tmp_path / mode, max_steps=3, max_staleness=2,
                                 stale_loss=mode, tis_cap=1.5))
    recompute, tis = (M.read(tmp_path / mode) for mode in ("recompute", "tis"))
    # step 1: the sampler's weights are the trainer's, every weight min(1, 1.5) = 1
    assert tis[0][M.LOSS] == pytest.approx(recompute[0][M.LOSS], rel=1e-5)
    assert tis[0][M.GRAD_NORM] == pytest.approx(recompute[0][M.GRAD_NORM], rel=1e-5)
    assert tis[1][M.LOSS] != pytest.approx(recompute[1][M.LOSS], rel=1e-4)  # one update stale


def test_opd_train_takes_the_staleness_flags(tiny_pair, tmp_path):
    out = tmp_path / "cli"
    code = main(["train", "--student", str(tiny_pair["student"]), "--teacher",
                 str(tiny_pair["teacher"]), "--prompts", str(tiny_pair["prompts"]), "--out",
                 str(out), "--max-steps", "3", "--prompts-per-step", "2",
                 "--samples-per-prompt", "2", "--max-new-tokens", "6", "--max-staleness", "1",
                 "--staleness-meter-every", "3", "--set", "progress=false"])
    assert code == 0
    records = M.read(out)
    assert [r[M.STALENESS] for r in records] == [0, 1, 1]
    assert [M.STALENESS_GRAD_COSINE in r for r in records] == [False, False, True]


def test_rollouts_ahead_are_refused_under_a_distributed_launch(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # as a launcher would
    with pytest.raises(OPDError, match="max_staleness: rollouts ahead of the update run in one "
                       "plain process"):
        Trainer(tiny_config(tiny_pair, tmp_path / "run", max_staleness=1))
    assert not (tmp_path / "run").exists()
