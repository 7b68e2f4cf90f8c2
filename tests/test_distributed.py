"""The same loop under `accelerate launch` with 2 CPU processes (DDP-style gradient sums
over gloo) gives the single-process loss curve for the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from opd.metrics import read as load_metrics

TOLERANCE = 1e-4  # relative; float sums in another order, nothing more


def train_command(tiny_pair, out):
    return ["-m", "opd", "train", "--student", str(tiny_pair["student"]), "--teacher",
            str(tiny_pair["teacher"]), "--prompts", str(tiny_pair["prompts"]), "--out", str(out),
            "--max-steps", "3", "--prompts-per-step", "4", "--rollouts-per-prompt", "2",
            "--max-new-tokens", "8", "--set", "lr=1e-3", "--set", "objective.k=4",
            "--set", "progress=false"]


@pytest.mark.slow
def test_two_processes_match_one(tiny_pair, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *train_command(tiny_pair, tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    double = subprocess.run([*launch, *train_command(tiny_pair, tmp_path / "two")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-2000:]
    assert double.stdout.count('"steps"') == 1  # the summary is printed by the main process only
    one, two = load_metrics(tmp_path / "one"), load_metrics(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "grad_norm", "overlap_ratio", "reverse_kl", "response_length"):
            assert b[key] == pytest.approx(a[key], rel=TOLERANCE, abs=1e-7), key
