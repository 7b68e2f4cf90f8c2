"""The metrics schema owns every key of metrics.jsonl; the refactored loop writes exactly what
the loop wrote before (tests/data/reference_metrics.json, made before the scoring pass, the
config system and the schema were reorganised)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd import metrics as M
from opd.config.training import build_config
from opd.errors import OPDError
from opd.run.loop import run_training

DOCS = Path(__file__).parents[1] / "docs" / "metrics.md"
REFERENCE = Path(__file__).parent / "data" / "reference_metrics.json"


def test_docs_metrics_md_is_generated_from_the_schema():
    assert DOCS.read_text() == M.markdown(), "run: python -m opd.metrics > docs/metrics.md"


def test_undeclared_keys_are_refused_and_a_cut_last_line_is_dropped(tmp_path):
    with pytest.raises(KeyError, match="undeclared keys"):
        M.append(tmp_path, {"step": 1, "lsos": 0.1})
    M.append(tmp_path, {"step": 1, "loss": 0.5})
    with (tmp_path / M.METRICS_FILE).open("a") as handle:
        handle.write('{"step": 2, "lo')  # a process killed mid-line
    assert M.read(tmp_path) == [{"step": 1, "loss": 0.5}]
    (tmp_path / M.METRICS_FILE).write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(OPDError, match=":1 is not valid JSON"):
        M.read(tmp_path)


RUNS = {
    "topk": {"objective.k": 4, "eval_every": 2, "eval_temperature": 0.0, "eval": True},
    "sampled_options": {"objective.name": "sampled", "loss_aggregation": "sequence-mean",
                        "kl_penalty": 0.1, "micro_batch": 3, "teacher_prompt": "own",
                        "chunk_size": 5},
    "subset_kl_teacher": {"objective": {"name": "subset_kl", "k": 3, "strategy": "teacher",
                                        "weighting": "teacher_p"}},
    "jsd_hybrid": {"objective": {"name": "jsd", "beta": 0.3, "teacher_temperature": 2.0},
                   "outcome_weight": 0.5},
    "grpo": {"teacher": "", "distill_weight": 0.0, "outcome_weight": 1.0},
    "lora": {"lora_rank": 4, "objective.k": 4},
    "union_none_cosine": {"objective": {"k": 4, "strategy": "union", "weighting": "none"},
                          "lr_schedule": "cosine", "warmup_steps": 2},
}


NOISE_AMPLIFIED = {"subset_kl_teacher": 0.05}
"""Runs whose steps after the first are compared within this relative tolerance, and without
their by-position bins (see `close`); the first step stays at 1e-3. Measured: on two machines
with other CPU kernels the same code gave step 2's overlap ratio 77/236 and 78/236 (1.3%), and
one of its position bins 7/24 and 8/24 (one position flipped)."""


def close(got, want, path="record", rel=1e-3):
    """Equal structure, floats within 1e-3 relative: the reference is exact with this machine's
    default threads; other thread counts and gradient orders sum differently (up to ≈ 2e-4 over
    four steps), while any change of behaviour (samples, objective, update) moves the values by
    far more. subset_kl_teacher is the fragile one: at step 1 some embedding entries get
    gradients at float-noise level (< 1e-9), which Adam's first update turns into ±lr steps, so
    a change in summation order alone moves its later steps by a few percent; its reference was
    remade when the top-k objectives moved from [N, V] masks to gathered candidates (step-1
    gradients equal to 1e-6 relative, 40 of those noise-level entries changing sign). The whole
    reference was remade when the sampler moved from Gumbel-max to the inverse of the cumulative
    distribution: the same distributions, other samples."""
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for key in want:
            close(got[key], want[key], f"{path}.{key}", rel)
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            close(a, b, f"{path}[{i}]", rel)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=rel, abs=1e-6), path
    else:
        assert got == want, path


@pytest.mark.parametrize("name", list(RUNS))
def test_fixed_seed_runs_write_the_reference_metrics(tiny_pair, tmp_path, name):
    settings = dict(RUNS[name])
    if settings.pop("eval", False):
        settings["eval_prompts"] = str(tiny_pair["prompts"])
    config = build_config({
        "student": str(tiny_pair["student"]), "teacher": str(tiny_pair["teacher"]),
        "prompts": str(tiny_pair["prompts"]), "out": str(tmp_path / name), "max_steps": 4,
        "prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 8, "lr": 1e-3,
        "save_every": 2, "measure_k": 4, "progress": False, **settings,
    })
    run_training(config)
    got = [{k: v for k, v in r.items() if not k.startswith("time_")} for r in M.read(config.out)]
    want = json.loads(REFERENCE.read_text())[name]
    close(got[:1], want[:1])
    later, later_want = got[1:], want[1:]
    if name in NOISE_AMPLIFIED:
        assert [set(r) for r in later] == [set(r) for r in later_want]
        later, later_want = ([{k: v for k, v in r.items() if k != M.BY_POSITION} for r in records]
                             for records in (later, later_want))
    close(later, later_want, rel=NOISE_AMPLIFIED.get(name, 1e-3))
    for record in M.read(config.out):
        assert set(record) <= set(M.SCHEMA)
