"""The vllm backend of `opd serve-teacher` against the hf backend on the same float32 teacher
(`make test-vllm`): equal token and top-k log-probs within TOPK_TOLERANCE, a top-k entropy
estimate that says so, refusals naming the hf backend, the same greedy samples, and a training
run and a diagnosis against the served vllm teacher."""

from __future__ import annotations

import json

import pytest
import torch
from tests.support import assert_close, assert_records_close, serving, tiny_config

from opd import metrics as M
from opd.cli import main
from opd.errors import OPDError
from opd.run.loop import run_training
from opd.teachers.protocol import BadRequest, GenerateRequest, Limits, ScoreRequest
from opd.teachers.server import HFBackend
from opd.teachers.vllm_backend import VLLMBackend
from tests_vllm.conftest import VLLM

TOPK_TOLERANCE = 1e-5
"""Largest |vllm − hf| log-prob allowed (token and top-k), float32 on a CPU (measured: 4.8e-7)."""
K = 8


@pytest.fixture(scope="module")
def backends(vllm_pair):
    """The teacher in both backends, and a few of its sequences with their response starts."""
    teacher = str(vllm_pair["teacher"])
    hf = HFBackend(teacher, dtype="float32", device=torch.device("cpu"))
    served = VLLMBackend(teacher, limits=Limits(), dtype="float32", settings=VLLM)
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, hf.vocab_size, (n,), generator=generator).tolist()
                 for n in (7, 12, 30)]
    yield hf, served, sequences, [3, 1, 20]
    served.engine.shutdown()


def scored(backend, sequences, starts, k=K, **options) -> list[dict[str, torch.Tensor]]:
    answer = backend.score(ScoreRequest(sequences, starts, k, **options))
    return [{name: torch.tensor(value) for name, value in r.items() if value is not None}
            for r in answer["results"]]


def test_vllm_top_k_log_probs_equal_the_hf_backends(backends):
    hf, served, sequences, starts = backends
    assert served.vocab_size == hf.vocab_size and served.fingerprint == hf.fingerprint
    for exact, estimate in zip(scored(hf, sequences, starts), scored(served, sequences, starts),
                               strict=True):
        assert torch.equal(estimate["topk_ids"], exact["topk_ids"])
        for name in ("token_logprobs", "topk_logprobs"):
            gap = (estimate[name] - exact[name]).abs().max()
            assert gap <= TOPK_TOLERANCE, (name, float(gap))
        # The entropy on the top-k only: below the whole one, and equal with k = V.
        assert (estimate["entropy"] <= exact["entropy"] + TOPK_TOLERANCE).all()
        assert (estimate["entropy"] < exact["entropy"] - 0.1).all()
    whole = scored(served, sequences, starts, k=hf.vocab_size)
    for exact, estimate in zip(scored(hf, sequences, starts), whole, strict=True):
        assert (estimate["entropy"] - exact["entropy"]).abs().max() <= TOPK_TOLERANCE
    answer = served.score(ScoreRequest(sequences, starts, K, encoding="base64"))
    assert answer["entropy"] == "topk" and answer["results"][0]["candidate_logprobs"] is None


def test_what_vllm_cannot_score_is_refused_naming_the_hf_backend(backends):
    _, served, sequences, starts = backends
    candidates = [[[1, 2]] * (len(s) - start) for s, start in zip(sequences, starts, strict=True)]
    with pytest.raises(BadRequest, match=r"^candidates: the vllm backend cannot score given token "
                       r"ids .* need a teacher served with --backend hf$") as err:
        served.score(ScoreRequest(sequences, starts, K, candidates=candidates))
    assert err.value.status == 422
    with pytest.raises(BadRequest, match=r"^temperature: the vllm backend scores at temperature 1 "
                       r"only .* --backend hf$"):
        served.score(ScoreRequest(sequences, starts, K, temperature=0.7))
    with pytest.raises(BadRequest, match=r"^sequences\[0\]: 200 tokens, more than the vllm "
                       r"engine's max_model_len \(128"):
        served.score(ScoreRequest([[5] * 200], [1], K))
    with pytest.raises(BadRequest, match=r"^prompts\[0\]: 100 tokens plus max_new_tokens \(64\), "
                       r"more than the vllm engine's max_model_len \(128"):
        served.generate(GenerateRequest([[5] * 100], max_new_tokens=64))


def test_vllm_greedy_samples_equal_the_hf_backends(backends):
    hf, served, sequences, _ = backends
    request = GenerateRequest([s[:5] for s in sequences], n=2, max_new_tokens=12, temperature=0.0)
    assert served.generate(request) == hf.generate(request)


@pytest.fixture(scope="module")
def served_vllm(vllm_pair):
    with serving(vllm_pair["teacher"], backend="vllm", dtype="float32",
                 **{"vllm.memory_share": VLLM.memory_share, "vllm.enforce_eager": True}) as (url, _):
        yield url


def test_training_against_a_served_vllm_teacher(vllm_pair, served_vllm, tmp_path):
    """The sampled objective and the teacher-side top-k: every value of the in-process run
    within TOPK_TOLERANCE but the entropies, which are marked as top-k estimates."""
    for objective in ({"objective.name": "sampled"},
                      {"objective.name": "topk", "objective.strategy": "teacher"}):
        settings = {"max_steps": 2, "save_every": 10, "objective.k": 5, "measure_k": 3,
                    "dtype": "float32", **objective}
        name = objective["objective.name"]
        run_training(tiny_config(vllm_pair, tmp_path / f"local-{name}", **settings))
        run_training(tiny_config(vllm_pair, tmp_path / f"served-{name}", teacher=served_vllm,
                                 **settings))
        local, remote = M.read(tmp_path / f"local-{name}"), M.read(tmp_path / f"served-{name}")
        assert all(r[M.TEACHER_ENTROPY_ESTIMATE] == "topk" for r in remote)
        assert all(M.TEACHER_ENTROPY_ESTIMATE not in r for r in local)
        entropies = (M.TEACHER_ENTROPY, M.ENTROPY_GAP, M.TEACHER_ENTROPY_ESTIMATE)
        for records in (local, remote):
            for record in records:
                for key in entropies:
                    record.pop(key, None)
                    record[M.BY_POSITION].pop(key, None)
        assert_records_close(local, remote, tolerance=TOPK_TOLERANCE)


@pytest.mark.parametrize(("setting", "message"), [
    ({"objective.name": "topk", "objective.strategy": "union"},
     r"^objective.strategy: the teacher served at .* \(vllm backend\) cannot score the student's "
     r"candidate tokens, .* serve it with --backend hf, or choose strategy teacher or intersection$"),
    ({"objective.name": "sampled", "objective.teacher_temperature": 0.7},
     r"^objective.teacher_temperature: the teacher served at .* \(vllm backend\) scores at "
     r"temperature 1 only; .*--backend hf$"),
])
def test_a_run_asking_what_vllm_cannot_score_stops_at_its_start(vllm_pair, served_vllm, tmp_path,
                                                               setting, message):
    with pytest.raises(OPDError, match=message):
        run_training(tiny_config(vllm_pair, tmp_path / "run", teacher=served_vllm, **setting))
    assert not (tmp_path / "run").exists()


def test_teachers_with_exact_and_estimated_entropies_are_not_mixed(vllm_pair, served_vllm,
                                                                   tmp_path):
    prompts = tmp_path / "two.jsonl"
    rows = [json.loads(line) for line in vllm_pair["prompts"].read_text().splitlines()]
    prompts.write_text("".join(json.dumps({**row, "source": "ab"[i % 2]}) + "\n"
                               for i, row in enumerate(rows)))
    teachers = {"a": str(vllm_pair["teacher"]), "b": served_vllm}
    with pytest.raises(OPDError, match=r"^teachers: the entropies of b are top-k estimates .* "
                       r"serve every teacher with the same backend$"):
        run_training(tiny_config(vllm_pair, tmp_path / "run", prompts=str(prompts),
                                 teachers=teachers, teacher="", **{"objective.name": "sampled"}))
    assert not (tmp_path / "run").exists()


def test_diagnose_against_a_served_vllm_teacher(vllm_pair, served_vllm, tmp_path):
    """Every measure of the local diagnosis within TOPK_TOLERANCE (greedy continuations and
    own attempts through vLLM alike) but the entropies, which the diagnosis and its report
    mark as top-k estimates."""
    common = ["diagnose", "--student", str(vllm_pair["student"]), "--prompts",
              str(vllm_pair["prompts"]), "--num-prompts", "6", "--samples-per-prompt", "2",
              "--max-new-tokens", "6", "--dtype", "float32", "--no-progress"]
    assert main([*common, "--teacher", str(vllm_pair["teacher"]), "--out", str(tmp_path / "l")]) == 0
    assert main([*common, "--teacher", served_vllm, "--out", str(tmp_path / "s")]) == 0
    local, remote = (json.loads((tmp_path / name / "diagnosis.json").read_text())["teacher"]
                     for name in ("l", "s"))
    assert (local.pop("entropy"), remote.pop("entropy")) == ("exact", "topk")
    assert "entropy gap (top-k estimate of the served teacher's entropy)" in (
        tmp_path / "s" / "report.md").read_text()
    for diagnosis in (local, remote):
        diagnosis.pop("path")
        for block in diagnosis["pattern"]["by_k"].values():
            for part in (block["overall"], block["by_position"]):
                part.pop(M.TEACHER_ENTROPY)
                part.pop(M.ENTROPY_GAP)
    assert_close(local, remote, tolerance=TOPK_TOLERANCE)
