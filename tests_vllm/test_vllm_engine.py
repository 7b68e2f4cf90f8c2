"""The vLLM rollout engine against the trainer, on the CPU build of vLLM (`make test-vllm`):
weight sync after an optimizer step (full and LoRA), a short OPD run, greedy evaluation equal
to opd's own sampler, and seeded requests that do not depend on their batch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import opd
from opd import metrics as M
from opd.data.prompts import load_prompts
from opd.errors import OPDError
from opd.evaluation.accuracy import evaluate
from opd.evaluation.verify import extract_answer
from opd.step.engines import VLLMEngine, sample_rollouts, vllm_engine
from opd.step.rollout import generate_rollouts, stop_token_ids
from tests_vllm.conftest import CONTEXT, SETTINGS, VLLM

SYNC_TOLERANCE = 1e-4
"""Largest |engine − trainer| log-prob allowed after a sync, in float32 (measured: ≤ 1e-6)."""
GAP_TOLERANCE = 1e-6
"""Largest mean rollout_logprob_gap allowed in a float32 run: 10x the measured mean (7-10e-8
nats) and 2x the largest gap of any one token (4.8e-7), docs/results.md's vLLM section."""


def engine_logprobs(engine: VLLMEngine, sequence: list[int]) -> torch.Tensor:
    """The engine's log-probs of tokens 1… of `sequence` given their prefixes."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine.wake()  # asleep after sampling on a GPU
    out = engine.llm.generate([TokensPrompt(prompt_token_ids=sequence)],
                              SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False),
                              use_tqdm=False)[0]
    return torch.tensor([step[token].logprob
                         for step, token in zip(out.prompt_logprobs[1:], sequence[1:], strict=True)])


def trainer_logprobs(model: torch.nn.Module, sequence: list[int]) -> torch.Tensor:
    ids = torch.tensor([sequence])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)


def one_step(model: torch.nn.Module, sequence: list[int]) -> None:
    """One AdamW step on the sequence's negative log-likelihood."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.tensor([sequence])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


SEQUENCE = [1, 9, 24, 10, 25, 14, 30, 2]


def test_the_engine_has_the_trainers_weights_after_an_optimizer_step(engine, vllm_pair):
    model = AutoModelForCausalLM.from_pretrained(vllm_pair["student"], dtype=torch.float32)
    engine.load_weights(model)
    before = engine_logprobs(engine, SEQUENCE)
    torch.testing.assert_close(before, trainer_logprobs(model, SEQUENCE), rtol=0,
                               atol=SYNC_TOLERANCE)
    one_step(model, SEQUENCE)
    engine.load_weights(model)
    after = engine_logprobs(engine, SEQUENCE)
    torch.testing.assert_close(after, trainer_logprobs(model, SEQUENCE), rtol=0,
                               atol=SYNC_TOLERANCE)
    assert (after - before).abs().max() > 100 * SYNC_TOLERANCE


def test_a_lora_student_is_synced_merged(engine, vllm_pair):
    import peft

    base = AutoModelForCausalLM.from_pretrained(vllm_pair["student"], dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8,
                                                      target_modules="all-linear"))
    engine.load_weights(model)
    before = engine_logprobs(engine, SEQUENCE)
    one_step(model, SEQUENCE)
    engine.load_weights(model)
    after = engine_logprobs(engine, SEQUENCE)
    torch.testing.assert_close(after, trainer_logprobs(model, SEQUENCE), rtol=0,
                               atol=SYNC_TOLERANCE)
    assert (after - before).abs().max() > 100 * SYNC_TOLERANCE
    assert any("lora_A" in name for name, _ in model.named_parameters())  # not merged in place


def _run(vllm_pair, out, **settings):
    return opd.train(student=str(vllm_pair["student"]), teacher=str(vllm_pair["teacher"]),
                     prompts=str(vllm_pair["prompts"]), eval_prompts=str(vllm_pair["prompts"]),
                     out=str(out), max_steps=3, prompts_per_step=4, samples_per_prompt=2,
                     max_new_tokens=16, max_prompt_tokens=16, lr=1e-3, eval_temperature=0.0,
                     progress=False, **{**SETTINGS, **settings})


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_short_run_on_vllm_writes_every_metric_and_trains(engine, vllm_pair, tmp_path):
    _run(vllm_pair, tmp_path / "hf")
    _run(vllm_pair, tmp_path / "vllm", rollout_engine="vllm", tis_cap=2.0)
    assert _files(tmp_path / "vllm") == _files(tmp_path / "hf")
    hf_records, records = M.read(tmp_path / "hf"), M.read(tmp_path / "vllm")
    assert [r[M.STEP] for r in records] == [1, 2, 3]
    engine_keys = {M.ROLLOUT_LOGPROB_GAP, M.ROLLOUT_LOGPROB_GAP_MAX}
    for hf_record, record in zip(hf_records, records, strict=True):
        assert set(record) == set(hf_record) | engine_keys
        assert set(record[M.BY_POSITION]) == set(M.TOKEN_MEASURES) | {M.ROLLOUT_LOGPROB_GAP}
        assert math.isfinite(record[M.LOSS]) and math.isfinite(record[M.GRAD_NORM])
        assert 0 <= record[M.ROLLOUT_LOGPROB_GAP] <= record[M.ROLLOUT_LOGPROB_GAP_MAX]
        assert record[M.ROLLOUT_LOGPROB_GAP] < GAP_TOLERANCE
        assert record[M.SKIPPED_STEPS] == 0
    assert len({r[M.LOSS] for r in records}) == 3  # the policy moved between steps
    first = AutoModelForCausalLM.from_pretrained(vllm_pair["student"])
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "vllm" / "model")
    assert not torch.equal(first.lm_head.weight, final.lm_head.weight)
    summary = json.loads((tmp_path / "vllm" / "summary.json").read_text())
    assert summary["alerts"] == []


def test_greedy_evaluation_on_vllm_equals_opds_sampler(engine, vllm_pair, tmp_path):
    """Answers are the final answers of the hf engine's own greedy responses for every other
    prompt, so hf gets those right and the rest wrong; vLLM must reproduce every verdict."""
    model = AutoModelForCausalLM.from_pretrained(vllm_pair["student"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(vllm_pair["student"])
    records = load_prompts(str(vllm_pair["prompts"]))
    texts = [r.messages[-1]["content"] for r in records]
    greedy = generate_rollouts(model, tokenizer, texts, max_new_tokens=12, temperature=0.0)
    answers = [extract_answer(g) if i % 2 == 0 else "never" for i, g in enumerate(greedy.texts)]
    rows = [{"prompt": t, "answer": a or "never"} for t, a in zip(texts, answers, strict=True)]
    prompts = tmp_path / "answers.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_prompts(str(prompts))
    options = dict(max_new_tokens=12, template="{prompt}")
    on_hf = evaluate(model, tokenizer, records, **options)
    on_vllm = evaluate(model, tokenizer, records, engine=engine, **options)
    assert on_hf.per_prompt == [float(a not in ("", "never")) for a in answers]
    assert on_hf.accuracy > 0
    assert on_vllm.per_prompt == on_hf.per_prompt
    assert on_vllm.mean_response_length == on_hf.mean_response_length
    result = opd.evaluate(str(vllm_pair["student"]), str(prompts), rollout_engine="vllm",
                          max_new_tokens=12, template="{prompt}",
                          **{k: v for k, v in SETTINGS.items() if k.startswith("vllm.")})
    assert result.per_prompt == on_hf.per_prompt


def test_a_seeded_rollout_does_not_depend_on_its_batch(engine, vllm_pair):
    model = AutoModelForCausalLM.from_pretrained(vllm_pair["student"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(vllm_pair["student"])
    prompts = ["1 + 2 =", "3 + 4 =", "0 + 0 ="]
    options = dict(max_new_tokens=16, temperature=1.0, seed=7)
    batch = sample_rollouts(engine, model, tokenizer, prompts, n=3, prompt_ids=[10, 11, 12],
                            **options)
    alone = sample_rollouts(engine, model, tokenizer, prompts[1:2], n=3, prompt_ids=[11],
                            **options)
    reordered = sample_rollouts(engine, model, tokenizer, prompts[::-1], n=3,
                                prompt_ids=[12, 11, 10], **options)
    assert alone.response_ids == batch.response_ids[3:6]
    assert reordered.response_ids == batch.response_ids[6:9] + batch.response_ids[3:6] \
        + batch.response_ids[0:3]
    assert len({tuple(r) for r in batch.response_ids}) > 3  # the samples do differ
    eos = stop_token_ids(model, tokenizer)
    assert all(r[-1] in eos or len(r) == 16 for r in batch.response_ids)



def test_a_greedy_diagnosis_on_vllm_equals_opds_sampler(vllm_pair):
    """Greedy rollouts, continuations and teacher attempts: the same tokens from either engine,
    so the same measures, curves and verdict (the engine moves from student to teacher)."""
    options = dict(num_prompts=8, samples_per_prompt=1, max_new_tokens=12, temperature=0.0, depths=(0.0, 0.5),
                   progress=False, dtype="float32",
                   **{k: v for k, v in SETTINGS.items() if k.startswith("vllm.")})
    args = (str(vllm_pair["student"]), str(vllm_pair["teacher"]), str(vllm_pair["prompts"]))
    on_hf = opd.diagnose(*args, **options)
    on_vllm = opd.diagnose(*args, rollout_engine="vllm", **options)
    assert on_vllm.verdict == on_hf.verdict
    assert on_vllm.data["teacher"] == on_hf.data["teacher"]
    assert on_vllm.data["student"] == on_hf.data["student"]


def test_select_prompts_on_vllm_measures_and_runs_its_trials_there(vllm_pair, tmp_path):
    vllm = {k: v for k, v in SETTINGS.items() if k.startswith("vllm.")}
    opd.select_prompts(str(vllm_pair["student"]), str(vllm_pair["teacher"]),
                       str(vllm_pair["prompts"]), str(tmp_path), num_prompts=8, samples_per_prompt=2,
                       max_new_tokens=6, k=4, trial_steps=1, trial_profile="cpu-small",
                       trial_settings={"prompts_per_step": 2, "samples_per_prompt": 2,
                                       "objective": {"k": 4}, "measure_k": 4, "dtype": "float32"},
                       teacher_template="a b {prompt}", rollout_engine="vllm", dtype="float32",
                       progress=False, **vllm)
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert selection["counts"]["candidates"] == 8
    for run in ("selected", "unselected"):
        records = M.read(tmp_path / "trial" / run)
        assert records and records[0][M.ROLLOUT_LOGPROB_GAP] < GAP_TOLERANCE


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_on_vllm_match_one(engine, vllm_pair, tmp_path, parallel):
    """Under torchrun each process runs its own engine on its share of the prompts, given the
    student's whole weights (replicated, or gathered from the FSDP shards); the seeded rollouts,
    hence the loss curve, are the single process's (as tests/test_distributed.py)."""
    options = ["--max-steps", "2", "--prompts-per-step", "4", "--samples-per-prompt", "2",
               "--max-new-tokens", "8", "--max-prompt-tokens", "16", "--set", "lr=1e-3",
               "--rollout-engine", "vllm", "--no-progress",
               *[f"--set={key}={value}" for key, value in SETTINGS.items()]]
    common = ["-m", "opd", "train", "--student", str(vllm_pair["student"]), "--teacher",
              str(vllm_pair["teacher"]), "--prompts", str(vllm_pair["prompts"]), *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    double = subprocess.run([*launch, *common, "--out", str(tmp_path / "two"),
                             f"--set=parallel={parallel}"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = M.read(tmp_path / "one"), M.read(tmp_path / "two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        for key in (M.LOSS, M.GRAD_NORM, M.OVERLAP_RATIO, M.REVERSE_KL, M.RESPONSE_LENGTH):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
        assert b[M.ROLLOUT_LOGPROB_GAP] < GAP_TOLERANCE


def test_the_cold_starts_teacher_data_come_from_the_engine(vllm_pair, tmp_path):
    """The kept responses are the engine's seeded samples of the teacher (opd's sampler would
    draw others); the OPD stage trains on vLLM too. Runs last: it starts an engine on the
    teacher, and the OPD stage one on sft/. The one-step SFT of random models does not pass
    the gate before OPD (that is the zoo tests' business), so the gate is overridden."""
    options = {"cold_start.temperature": 1.0, "cold_start.top_p": 1.0,
               "cold_start.samples_per_prompt": 1, "cold_start.keep": "all",
               "cold_start.sft_steps": 1}
    opd.cold_start(student=str(vllm_pair["student"]), teacher=str(vllm_pair["teacher"]),
                   prompts=str(vllm_pair["prompts"]), out=str(tmp_path), max_steps=1,
                   prompts_per_step=4, samples_per_prompt=1, max_new_tokens=64,
                   max_prompt_tokens=16, progress=False, rollout_engine="vllm", force=True,
                   **options, **SETTINGS)
    kept = [json.loads(line) for line in (tmp_path / "teacher_data.jsonl").read_text().splitlines()]
    assert kept
    teacher = AutoModelForCausalLM.from_pretrained(vllm_pair["teacher"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(vllm_pair["teacher"])
    texts = [r.messages[-1]["content"] for r in load_prompts(str(vllm_pair["prompts"]))]
    on_teacher = vllm_engine(str(vllm_pair["teacher"]), dtype=torch.float32,
                             max_model_len=CONTEXT, settings=VLLM)
    samples = sample_rollouts(on_teacher, teacher, tokenizer, texts, max_new_tokens=64,
                              temperature=1.0, top_p=1.0, seed=0)
    assert [r["response"] for r in kept] == [
        text for text, cut in zip(samples.texts, samples.truncated.tolist(), strict=True)
        if not cut]
    records = M.read(tmp_path / "opd")
    assert records and records[-1][M.ROLLOUT_LOGPROB_GAP] < GAP_TOLERANCE


def test_a_prompt_longer_than_the_engine_allows_is_named(engine, vllm_pair):
    model = AutoModelForCausalLM.from_pretrained(vllm_pair["student"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(vllm_pair["student"])
    with pytest.raises(OPDError, match=r"rollout_engine: a prompt of 5 tokens plus "
                       r"max_new_tokens \(200\) exceeds the vLLM engine's length limit \(128"):
        sample_rollouts(engine, model, tokenizer, ["1 + 2 ="], max_new_tokens=200)


def test_an_engine_that_cannot_start_is_one_line(vllm_pair):
    """vLLM refuses a length limit beyond the model's context window (opd asks for at most the
    window, so this stands for any refusal at start): one line naming the folder."""
    with pytest.raises(OPDError, match=r"^rollout_engine: the vLLM engine could not start on") as err:
        vllm_engine(str(vllm_pair["teacher"]), dtype=torch.float32, max_model_len=4 * CONTEXT,
                    settings=VLLM)
    assert "\n" not in str(err.value)
