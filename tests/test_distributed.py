"""The loop under `accelerate launch` with 2 CPU processes (gloo): the student replicated
(`parallel: ddp`) or sharded by FSDP2 (`parallel: fsdp`), with tied and untied embeddings and
with LoRA, gives the single-process loss and gradient-norm curve for the same global batch; a
killed sharded run resumes to the uninterrupted metrics; its checkpoints continue on another
number of processes; the gathered model folder loads with `from_pretrained` and scores like the
in-memory model.

One launch trains every two-process configuration (tests/distributed_runs.py), since starting
the processes costs more than a tiny run. `--multi_gpu` is accelerate's launcher of several
processes (torchrun); on a machine without GPUs, as here, they run on the CPU over gloo
(`--cpu` would start one process only, without MPI).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from opd.config.training import build_config
from opd.metrics import METRICS_FILE
from opd.metrics import read as load_metrics
from opd.run.loop import run_training
from tests.conftest import make_tokenizer
from tests.distributed_runs import PROBE_IDS
from tests.support import ENV, LAUNCH, cli_args, serving, without_times
from tests.tiny_models import save_model

TOLERANCE = 1e-4  # relative; float sums in another order, nothing more
CURVE = ("loss", "grad_norm", "overlap_ratio", "reverse_kl", "response_length", "accuracy")

pytestmark = pytest.mark.slow


def run_settings(tiny_pair, out, **overrides) -> dict:
    return {"student": str(tiny_pair["student"]), "teacher": str(tiny_pair["teacher"]),
            "prompts": str(tiny_pair["prompts"]), "out": str(out), "max_steps": 3,
            "prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 8, "lr": 1e-3,
            "save_every": 2, "objective.k": 4, "measure_k": 4, "progress": False,
            "chunk_size": 5, **overrides}  # several head chunks, unequal between processes


def launch(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([*LAUNCH, *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def close(a: float | None, b: float | None, rel: float) -> bool:
    return a == b or (a is not None and b is not None and b == pytest.approx(a, rel=rel, abs=1e-7))


CONFIGURATIONS = {
    "fsdp, tied": {"parallel": "fsdp", "max_steps": 4},
    "fsdp, untied": {"parallel": "fsdp", "student": "UNTIED", "micro_batch": 3,
                     "eval_prompts": "PROMPTS"},
    "fsdp, LoRA": {"parallel": "fsdp", "lora_rank": 4},
    "ddp, tied": {"parallel": "ddp"},
    "fsdp, sharded teacher, activation checkpointing": {
        "parallel": "fsdp", "teacher_parallel": "fsdp", "activation_checkpointing": True},
    "fsdp, two teachers": {"parallel": "fsdp", "teacher": "", "prompts": "SOURCES",
                           "teachers": {"a": "TEACHER", "b": "UNTIED"}},
    "ddp, served teacher": {"parallel": "ddp", "teacher": "SERVED"},
}
"""Two-process runs, each compared with one process of the same settings without the
`LEFT_OUT_OF_REFERENCE` ones. "UNTIED" stands for an untied student made by the fixture, "PROMPTS"
for the prompt file (evaluated on whole parameters, by the main process alone), "TEACHER" for
the teacher folder, "SOURCES" for the prompts tagged with two sources (a teacher each, so a
process may hold no prompt of one of them), "SERVED" for the teacher served on 127.0.0.1 while
the runs train (opd serve-teacher)."""
LEFT_OUT_OF_REFERENCE = ("parallel", "teacher_parallel", "activation_checkpointing")
BF16 = {"parallel": "fsdp", "mixed_precision": "bf16", "dtype": "float32"}
"""A two-process run in bfloat16 with float32 master weights (meant for GPUs; here it must run)."""
PROBED = ("fsdp, tied", "fsdp, LoRA")


@pytest.fixture(scope="module")
def runs(tiny_pair, tmp_path_factory) -> dict:
    """Every configuration trained in one process (here) and in two (one launch), plus a
    one-process checkpoint resumed on two processes."""
    root = tmp_path_factory.mktemp("distributed")
    untied = save_model(root / "untied", "llama", make_tokenizer(), seed=3, tied=False)
    rows = tiny_pair["prompts"].read_text().splitlines()
    sources = root / "sources.jsonl"
    sources.write_text("".join(json.dumps({**json.loads(row), "source": "ab"[i % 2]}) + "\n"
                               for i, row in enumerate(rows)))
    with serving(tiny_pair["teacher"]) as (url, _):
        stand_ins = {"UNTIED": str(untied), "PROMPTS": str(tiny_pair["prompts"]),
                     "TEACHER": str(tiny_pair["teacher"]), "SOURCES": str(sources),
                     "SERVED": url}
        return _train_every_configuration(tiny_pair, root, stand_ins)


def _train_every_configuration(tiny_pair, root: Path, stand_ins: dict[str, str]) -> dict:
    def stand_in(value):
        if isinstance(value, dict):
            return {k: stand_in(v) for k, v in value.items()}
        return stand_ins.get(value, value) if isinstance(value, str) else value

    one, two, spec = {}, {}, []
    for name, overrides in CONFIGURATIONS.items():
        overrides = {k: stand_in(v) for k, v in overrides.items()}
        slug = name.replace(", ", "-").replace(" ", "-")
        single = {k: v for k, v in overrides.items() if k not in LEFT_OUT_OF_REFERENCE}
        single = {**single, "max_steps": 6} if name == "fsdp, tied" else single
        run_training(build_config(run_settings(tiny_pair, root / f"one-{slug}", **single)))
        one[name] = load_metrics(root / f"one-{slug}")
        two[name] = root / f"two-{slug}"
        spec.append({"settings": run_settings(tiny_pair, two[name], **overrides),
                     "probe": str(root / f"probe-{slug}.json") if name in PROBED else None})
    # The one-process tied run, cut back to its step-4 checkpoint, continues on two processes.
    resumed = root / "one-on-two"
    shutil.copytree(root / "one-fsdp-tied", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000006")
    spec.append({"settings": run_settings(tiny_pair, resumed, parallel="fsdp", max_steps=6),
                 "resume": True})
    spec.append({"settings": run_settings(tiny_pair, root / "two-bf16", **BF16)})
    (root / "spec.json").write_text(json.dumps(spec))
    launch(str(Path(__file__).with_name("distributed_runs.py")), str(root / "spec.json"))
    return {"root": root, "one": one, "two": two, "one_on_two": resumed, "bf16": root / "two-bf16"}


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_two_processes_match_one(runs, name):
    one, two = runs["one"][name], load_metrics(runs["two"][name])
    assert len(two) == CONFIGURATIONS[name].get("max_steps", 3)
    for a, b in zip(one, two, strict=False):
        for key in CURVE:
            assert close(a.get(key), b.get(key), TOLERANCE), (a["step"], key, a.get(key), b.get(key))
    optimizer = runs["two"][name] / "checkpoints" / f"step-{len(two):06d}" / "optimizer"
    assert len(list(optimizer.glob("*.safetensors"))) == 2  # one share per process, no pickle


@pytest.mark.parametrize("name", PROBED)
def test_the_gathered_model_loads_and_scores_like_the_one_in_memory(runs, name):
    from transformers import AutoModelForCausalLM

    folder = runs["two"][name] / "model"
    assert not (folder / "optimizer").exists()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        loaded = model(input_ids=torch.tensor(PROBE_IDS)).logits.log_softmax(-1)
    in_memory = torch.tensor(json.loads((runs["root"] / f"probe-{name.replace(', ', '-')}.json")
                                        .read_text()))
    torch.testing.assert_close(loaded, in_memory, rtol=1e-5, atol=1e-5)


def test_bf16_mixed_precision_trains_and_keeps_float32_weights(runs):
    from safetensors.torch import load_file

    records = load_metrics(runs["bf16"])
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    weights = load_file(runs["bf16"] / "model" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    # bf16 arithmetic: near the float32 curve, not on it
    first = runs["one"]["ddp, tied"][0]
    assert records[0]["loss"] != first["loss"]
    assert records[0]["loss"] == pytest.approx(first["loss"], rel=0.05)


def test_a_one_process_checkpoint_continues_on_two(runs):
    one, continued = runs["one"]["fsdp, tied"], load_metrics(runs["one_on_two"])
    assert [r["step"] for r in continued] == [1, 2, 3, 4, 5, 6]
    assert without_times(continued[:4]) == without_times(one[:4])  # kept as they were
    for a, b in zip(one[4:], continued[4:], strict=True):  # sums in another order
        assert all(close(a.get(key), b.get(key), 1e-3) for key in CURVE), (a, b)


def test_a_sharded_checkpoint_continues_on_one_process(runs, tiny_pair, tmp_path):
    out = tmp_path / "two-on-one"
    shutil.copytree(runs["two"]["fsdp, tied"], out)
    run_training(build_config(run_settings(tiny_pair, out, parallel="fsdp", max_steps=6)),
                 resume=True)
    one, continued = runs["one"]["fsdp, tied"], load_metrics(out)
    assert [r["step"] for r in continued] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(one, continued, strict=True):
        assert all(close(a.get(key), b.get(key), 1e-3) for key in CURVE), (a, b)


def test_a_damaged_sharded_optimizer_state_is_named(runs, tiny_pair, tmp_path, capsys):
    """A share whose bytes are damaged but whose size is right (so the manifest passes)."""
    from opd.cli import main

    out = tmp_path / "damaged"
    shutil.copytree(runs["two"]["fsdp, tied"], out)
    share = next((out / "checkpoints" / "step-000004" / "optimizer").glob("*.safetensors"))
    share.write_bytes(b"\0" * share.stat().st_size)
    code = main(["train", *cli_args(run_settings(tiny_pair, out, parallel="fsdp", max_steps=6))[3:],
                 "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "optimizer is damaged" in err and "delete" in err and "step-000004" in err


def test_a_killed_sharded_run_resumes_to_the_uninterrupted_metrics(runs, tiny_pair, tmp_path):
    """SIGKILL to every process of the launch once step 3 is logged (the last checkpoint is
    step 2's), then `--resume` on two processes: the metrics of the uninterrupted run."""
    out = tmp_path / "killed"
    args = cli_args(run_settings(tiny_pair, out, parallel="fsdp", max_steps=4))
    process = subprocess.Popen([*LAUNCH, *args], env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        metrics = out / METRICS_FILE
        if metrics.exists() and metrics.read_text().count("\n") >= 3:
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert len(load_metrics(out)) < 4
    launch(*args, "--resume")
    assert without_times(load_metrics(out)) == without_times(load_metrics(runs["two"]["fsdp, tied"]))
