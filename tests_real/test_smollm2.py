"""Every verb on a real pretrained model: SmolLM2-135M-Instruct, given as its GGUF file.

Sizes are the smallest that still exercise each path (a few prompts, short responses): a
135M-parameter model on 2 CPU cores takes seconds per short step."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from tests.support import ENV, IDEAL, LAUNCH, cli_args, serving

import opd
from opd import metrics as M
from opd.errors import OPDError
from opd.models.gguf import SOURCE_FILE, converted_folder

TOLERANCE = 1e-4
"""float32 sums over a 49,152-token vocabulary: measured within 1e-6; 1e-4 leaves room."""

SMALL = {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 12,
         "max_prompt_tokens": 96, "objective.k": 8, "measure_k": 8, "lr": 1e-4,
         "warmup_steps": 0, "eval_every": 0, "progress": False}


def test_a_gguf_file_becomes_an_ordinary_folder_once(smollm2_gguf, smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert config["vocab_size"] == 49152
    assert (smollm2 / "model.safetensors").exists() and (smollm2 / "tokenizer.json").exists()
    source = json.loads((smollm2 / SOURCE_FILE).read_text())
    assert source["file"] == smollm2_gguf.name
    written = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert converted_folder(str(smollm2_gguf), "student") == str(smollm2)  # the cache
    assert converted_folder(str(smollm2_gguf.parent), "student") == str(smollm2)  # its folder
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == written


def test_the_chat_template_and_system_prompt_come_from_the_file(smollm2):
    from opd.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2), "student")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


def test_a_twin_teacher_gives_the_ideal_measures(smollm2_gguf, addition_prompts, tmp_path):
    result = opd.train(student=str(smollm2_gguf), teacher=str(smollm2_gguf),
                       prompts=str(addition_prompts), out=str(tmp_path / "run"), max_steps=1,
                       **SMALL)
    (record,) = result.metrics()
    assert record[M.RESPONSE_LENGTH] > 1
    for name, want in IDEAL.items():
        assert record[name] == pytest.approx(want, abs=TOLERANCE), name


def test_opd_steps_with_lora_from_a_sharper_teacher(smollm2_gguf, smollm2, addition_prompts,
                                                    tmp_path):
    """The same model at teacher temperature 0.5 is another distribution over the same
    vocabulary: a real signal, and three LoRA steps that write an ordinary model folder."""
    result = opd.train(student=str(smollm2_gguf), teacher=str(smollm2_gguf),
                       prompts=str(addition_prompts), out=str(tmp_path / "run"), max_steps=3,
                       save_every=3, lora_rank=4, **{"objective.teacher_temperature": 0.5},
                       **SMALL)
    records = result.metrics()
    assert len(records) == 3
    assert all(r[M.REVERSE_KL] > 0.01 and torch.isfinite(torch.tensor(r[M.LOSS])) for r in records)
    # A LoRA run's model folder holds the adapters, with the converted folder as their base.
    adapter = json.loads((result.model / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(smollm2)


def test_resume_continues_exactly(smollm2_gguf, addition_prompts, tmp_path):
    settings = dict(student=str(smollm2_gguf), teacher=str(smollm2_gguf),
                    prompts=str(addition_prompts), save_every=1,
                    **{"objective.teacher_temperature": 0.5}, **SMALL)
    whole = opd.train(out=str(tmp_path / "whole"), max_steps=2, **settings).metrics()
    opd.train(out=str(tmp_path / "cut"), max_steps=1, **settings)
    resumed = opd.train(out=str(tmp_path / "cut"), max_steps=2, resume=True, **settings).metrics()
    assert [r[M.LOSS] for r in resumed] == [r[M.LOSS] for r in whole]


def test_bf16_runs_and_stays_close_to_float32(smollm2_gguf, addition_prompts, tmp_path):
    settings = dict(student=str(smollm2_gguf), teacher=str(smollm2_gguf),
                    prompts=str(addition_prompts), max_steps=1,
                    **{"objective.teacher_temperature": 0.5}, **SMALL)
    (full,) = opd.train(out=str(tmp_path / "f32"), dtype="float32", **settings).metrics()
    (half,) = opd.train(out=str(tmp_path / "bf16"), dtype="bfloat16", **settings).metrics()
    assert half[M.RESPONSE_LENGTH] > 1 and torch.isfinite(torch.tensor(half[M.LOSS]))
    # bf16 samples other tokens, so only the scale of the signal is compared.
    assert half[M.REVERSE_KL] == pytest.approx(full[M.REVERSE_KL], rel=1.0)


def test_eval_runs_on_the_gguf_file(smollm2_gguf, addition_prompts):
    result = opd.evaluate(str(smollm2_gguf), str(addition_prompts), max_new_tokens=8,
                          temperature=0.0)
    assert result.n_prompts == 32 and 0.0 <= result.accuracy <= 1.0


def test_diagnose_sees_no_novelty_in_a_twin(smollm2_gguf, addition_prompts, tmp_path):
    diagnosis = opd.diagnose(str(smollm2_gguf), str(smollm2_gguf), str(addition_prompts),
                             out=tmp_path / "diagnosis", num_prompts=4, samples_per_prompt=2,
                             max_new_tokens=12, depths=(0.0,), progress=False)
    assert diagnosis.verdict == "no-novelty"
    assert diagnosis.teacher.measures[M.OVERLAP_RATIO] == pytest.approx(1.0, abs=TOLERANCE)
    assert (tmp_path / "diagnosis" / "diagnosis.json").exists()


def test_cold_start_runs_its_stages(smollm2_gguf, addition_prompts, tmp_path):
    result = opd.cold_start(str(smollm2_gguf), str(smollm2_gguf), str(addition_prompts),
                            out=tmp_path / "cold", max_steps=1, force=True,
                            cold_start={"samples_per_prompt": 1, "max_attempts": 1,
                                        "sft_steps": 2, "sft_batch_size": 4, "sft_eval_every": 1,
                                        "gate_prompts": 4, "keep": "all"},
                            **SMALL)
    assert result.teacher_data.exists() and result.sft.exists()
    assert len(result.opd.metrics()) == 1


def test_select_prompts_ranks_real_prompts(smollm2_gguf, addition_prompts, tmp_path):
    selection = opd.select_prompts(str(smollm2_gguf), str(smollm2_gguf), str(addition_prompts),
                                   tmp_path / "selection", num_prompts=8, samples_per_prompt=2,
                                   max_new_tokens=12, k=8, trial_steps=0, progress=False)
    assert selection.counts and selection.prompts.exists()


def test_a_served_teacher_scores_like_the_local_one(smollm2, addition_prompts, tmp_path):
    settings = dict(student=str(smollm2), prompts=str(addition_prompts), max_steps=1,
                    **{"objective.teacher_temperature": 1.0}, **SMALL)
    (local,) = opd.train(teacher=str(smollm2), out=str(tmp_path / "local"), **settings).metrics()
    with serving(smollm2) as (url, _):
        (served,) = opd.train(teacher=url, out=str(tmp_path / "served"), **settings).metrics()
    for name in (M.LOSS, M.REVERSE_KL, M.OVERLAP_RATIO):
        assert served[name] == pytest.approx(local[name], abs=1e-5), name


def test_a_teacher_with_another_vocabulary_is_refused_at_once(smollm2_gguf, gemma_gguf,
                                                              addition_prompts, tmp_path):
    with pytest.raises(OPDError, match="tokenizer mismatch"):
        opd.train(student=str(smollm2_gguf), teacher=str(gemma_gguf),
                  prompts=str(addition_prompts), out=str(tmp_path / "run"), max_steps=1, **SMALL)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_gemma_teaches_smollm2_across_tokenizers(smollm2_gguf, gemma_gguf, addition_prompts,
                                                 tmp_path):
    """Gemma-3-270M (262,144 tokens, no chat template) scores SmolLM2's rollouts re-tokenized:
    a LoRA step trains, and a share of the positions lines up one to one (measured: 0.40)."""
    result = opd.train(student=str(smollm2_gguf), teacher=str(gemma_gguf),
                       prompts=str(addition_prompts), out=str(tmp_path / "run"), max_steps=1,
                       lora_rank=4, **{**SMALL, "objective.name": "cross_tokenizer_kl"})
    (record,) = result.metrics()
    assert record[M.RESPONSE_LENGTH] > 1 and math.isfinite(record[M.LOSS])
    assert 0.1 < record[M.ALIGNED_SHARE] < 1
    assert record[M.REVERSE_KL] > 0.1  # two different models


def test_two_fsdp_processes_train_like_one(smollm2, addition_prompts, tmp_path):
    """The same global batch on 2 processes (gloo, the student sharded by FSDP2) gives the
    one-process curve."""
    settings = {"student": str(smollm2), "teacher": str(smollm2), "prompts": str(addition_prompts),
                "max_steps": 2, "parallel": "fsdp", "objective.teacher_temperature": 0.5,
                **SMALL}
    one = opd.train(out=str(tmp_path / "one"), **settings).metrics()
    subprocess.run([*LAUNCH, *cli_args({**settings, "out": str(tmp_path / "two")})], env=ENV,
                   check=True, timeout=1200)
    two = M.read(tmp_path / "two")
    for name in (M.LOSS, M.REVERSE_KL, M.OVERLAP_RATIO, M.RESPONSE_LENGTH):
        assert [r[name] for r in two] == pytest.approx([r[name] for r in one], rel=1e-4), name
