"""The rollout engines' parts that need no vLLM: the missing-extra error (raised before anything
is written), truncated importance sampling, the engine/trainer mismatch warning, the LoRA
weights given to an engine, and the engine's log-probs in the trainer's token order.
The engine itself is tested in tests_vllm/ (`make test-vllm`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import opd
import opd.step.engines
from opd import metrics as M
from opd.config.training import ObjectiveConfig, build_config
from opd.errors import OPDError
from opd.run.monitor import Monitor, MonitorThresholds, check_signatures
from opd.step.engines import checkpoint_weights, require_engine, sampled_token_logprobs
from opd.step.objectives import StepLoss, truncated_importance_weight
from opd.step.rollout import assemble_rollouts
from tests.conftest import make_tokenizer


@pytest.fixture
def without_vllm(monkeypatch):
    """vLLM absent, whatever this environment has installed."""
    monkeypatch.setattr(opd.step.engines, "is_installed", lambda module: module != "vllm")


def test_vllm_engine_without_vllm_stops_at_start_naming_the_extra(tiny_pair, tmp_path,
                                                                  without_vllm):
    out = tmp_path / "run"
    with pytest.raises(OPDError) as err:
        opd.train(student=str(tiny_pair["student"]), teacher=str(tiny_pair["teacher"]),
                  prompts=str(tiny_pair["prompts"]), out=str(out), rollout_engine="vllm",
                  max_steps=1, prompts_per_step=2, max_new_tokens=4, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("rollout_engine: vllm is not installed")
    assert 'pip install "opd[vllm]"' in message
    assert not out.exists()


def test_cold_start_on_vllm_without_vllm_stops_before_writing(tiny_pair, tmp_path, without_vllm):
    out = tmp_path / "cold"
    with pytest.raises(OPDError, match=r'rollout_engine: vllm is not installed; pip install "opd\[vllm\]"'):
        opd.cold_start(student=str(tiny_pair["student"]), teacher=str(tiny_pair["teacher"]),
                       prompts=str(tiny_pair["prompts"]), out=str(out), rollout_engine="vllm",
                       progress=False)
    assert not out.exists()


def test_select_prompts_trials_on_vllm_without_vllm_stop_before_writing(tiny_pair, tmp_path,
                                                                        without_vllm):
    out = tmp_path / "selection"
    with pytest.raises(OPDError, match=r"trial_settings\.rollout_engine: vllm is not installed"):
        opd.select_prompts(str(tiny_pair["student"]), str(tiny_pair["teacher"]),
                           str(tiny_pair["prompts"]), str(out),
                           trial_settings={"rollout_engine": "vllm"}, progress=False)
    assert not out.exists()


def test_diagnose_on_vllm_without_vllm_stops_before_writing(tiny_pair, tmp_path, without_vllm):
    out = tmp_path / "diagnosis"
    with pytest.raises(OPDError, match=r'rollout_engine: vllm is not installed; pip install "opd\[vllm\]"'):
        opd.diagnose(str(tiny_pair["student"]), str(tiny_pair["teacher"]), str(tiny_pair["prompts"]),
                     out=out, rollout_engine="vllm", progress=False)
    assert not out.exists()


def test_select_prompts_on_vllm_without_vllm_stops_before_writing(tiny_pair, tmp_path,
                                                                   without_vllm):
    out = tmp_path / "selection"
    with pytest.raises(OPDError, match=r"^rollout_engine: vllm is not installed"):
        opd.select_prompts(str(tiny_pair["student"]), str(tiny_pair["teacher"]),
                           str(tiny_pair["prompts"]), str(out), rollout_engine="vllm",
                           progress=False)
    assert not out.exists()


def test_select_prompts_trials_follow_its_engine_unless_trial_settings_say_otherwise():
    from opd.recipes.select_prompts import SelectConfig, _trial_config

    config = SelectConfig(student="s", teacher="t", prompts="p", out="o", rollout_engine="vllm",
                          vllm=opd.step.engines.VLLMConfig(memory_share=0.2))
    trial = _trial_config(config, "selected", Path("o"))
    assert trial.rollout_engine == "vllm" and trial.vllm.memory_share == 0.2
    other = dataclasses.replace(config, trial_settings={"rollout_engine": "hf"})
    assert _trial_config(other, "selected", Path("o")).rollout_engine == "hf"


def test_eval_on_vllm_without_vllm_names_the_extra(tiny_pair, without_vllm):
    with pytest.raises(OPDError, match=r'rollout_engine: vllm is not installed; pip install "opd\[vllm\]"'):
        opd.evaluate(str(tiny_pair["student"]), str(tiny_pair["prompts"]), rollout_engine="vllm")


def test_unknown_engine_is_named():
    with pytest.raises(OPDError, match="rollout_engine: unknown engine 'sglang'"):
        require_engine("sglang")


def test_tis_cap_needs_the_vllm_engine():
    with pytest.raises(OPDError, match="tis_cap needs rollout_engine=vllm or max_staleness > 0"):
        build_config({"tis_cap": 2.0})
    assert build_config({"tis_cap": 2.0, "rollout_engine": "vllm"}).tis_cap == 2.0


def test_truncated_importance_weight_is_the_capped_detached_ratio():
    trainer = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    engine = torch.tensor([-1.5, -1.0, -0.5])
    weight = truncated_importance_weight(trainer, engine, cap=1.5)
    assert not weight.requires_grad
    assert weight.tolist() == pytest.approx([1.5, torch.exp(torch.tensor(-1.0)).item(), 1.0])


def test_tis_cap_reweights_each_tokens_loss():
    """With the cap, the loss is Σ weight · ρ · per-token loss; without it, ρ = 1."""
    torch.manual_seed(0)
    mask = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    student_lp = torch.randn(3, 7).log_softmax(-1).requires_grad_(True)
    teacher_lp = torch.randn(3, 7).log_softmax(-1)
    targets = torch.tensor([1, 4, 2])
    token_lp = student_lp.gather(-1, targets[:, None]).squeeze(-1)
    engine_lp = token_lp.detach() + torch.tensor([0.5, -0.5, 0.0])
    objective = ObjectiveConfig(name="sampled")

    def loss(tis_cap: float) -> torch.Tensor:
        step = StepLoss.build(objective, mask, aggregation="token-mean", total_tokens=3,
                              total_rows=1, distill_weight=1.0, kl_coef=0.0, tis_cap=tis_cap)
        part = step.rows(slice(0, 1), torch.zeros(3, dtype=torch.long), torch.device("cpu"),
                         behaviour_lp=engine_lp)
        return part.chunk(student_lp, teacher_lp, targets, token_lp, slice(0, 3))

    per_token = (-(teacher_lp.gather(-1, targets[:, None]).squeeze(-1) - token_lp).detach()
                 * token_lp)
    rho = torch.tensor([torch.exp(torch.tensor(-0.5)).item(), 1.2, 1.0])
    assert float(loss(0.0).detach()) == pytest.approx(float(per_token.sum() / 3), rel=1e-6)
    assert float(loss(1.2).detach()) == pytest.approx(float((rho * per_token).sum() / 3), rel=1e-6)


def _gap_history(gaps):
    return [{M.STEP: step, M.ROLLOUT_LOGPROB_GAP: gap, M.ROLLOUT_LOGPROB_GAP_MAX: 2 * gap}
            for step, gap in enumerate(gaps, start=1)]


def test_a_growing_engine_gap_warns_once_without_stopping():
    thresholds = MonitorThresholds(window=2, rollout_logprob_gap=0.1)
    assert check_signatures(_gap_history([1e-6, 0.05, 0.08]), thresholds) == []
    said: list[str] = []
    monitor = Monitor("stop", thresholds, echo=said.append)
    fired = [[a for a in monitor.observe(r)] for r in _gap_history([0.01, 0.3, 0.4, 0.5])]
    assert [[a.rule for a in alerts] for alerts in fired] == [[], ["rollout-mismatch"], [], []]
    alert = fired[1][0]
    assert alert.stops is False and "tis_cap" in alert.recipe
    assert alert.evidence[M.ROLLOUT_LOGPROB_GAP] == pytest.approx(0.155)
    assert len(said) == 1


def test_a_run_on_the_hf_engine_is_never_judged_for_the_gap():
    history = [{M.STEP: s, M.OVERLAP_RATIO: 0.8} for s in range(1, 20)]
    assert check_signatures(history, MonitorThresholds(window=4)) == []


def test_lora_weights_are_merged_without_touching_the_trained_model(tiny_pair):
    import peft  # the dev extra installs it: this test runs in every `make test`
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_pair["student"])
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8,
                                                      target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights = dict(checkpoint_weights(model))
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    reference = AutoModelForCausalLM.from_pretrained(tiny_pair["student"])
    expected = peft.get_peft_model(reference, peft.LoraConfig(r=4, lora_alpha=8,
                                                              target_modules="all-linear"))
    expected.load_state_dict(model.state_dict())
    merged = dict(expected.merge_and_unload().named_parameters(remove_duplicate=False))
    assert set(weights) == set(merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-6, atol=1e-6)
    assert not torch.equal(weights["model.layers.0.self_attn.q_proj.weight"],
                           base.model.layers[0].self_attn.q_proj.base_layer.weight)


def test_engine_logprobs_follow_the_trainers_token_order():
    tokenizer = make_tokenizer()
    responses = [[5, 6, tokenizer.eos_token_id], [7], [8, 9]]
    logprobs = [[-0.1, -0.2, -0.3], [-0.4], [-0.5, -0.6]]
    rollouts = assemble_rollouts(tokenizer, [[1, 4], [1, 4, 4]], [0, 1, 1], responses,
                                 {tokenizer.eos_token_id}, tokenizer.pad_token_id,
                                 sampled_logprobs=logprobs)
    assert rollouts.truncated.tolist() == [False, True, True]
    predicts = rollouts.response_mask[:, 1:]
    assert int(predicts.sum()) == 6
    got = sampled_token_logprobs(rollouts, slice(1, 3))
    assert got.tolist() == pytest.approx([-0.4, -0.5, -0.6])
    targets = rollouts.input_ids[1:3, 1:][predicts[1:3]]
    assert targets.tolist() == [7, 8, 9]
    assert sampled_token_logprobs(assemble_rollouts(
        tokenizer, [[1]], [0], [[5]], set(), 0), slice(0, 1)) is None
