"""Helpers several test modules share: settings of the tiny pair's runs, hooks, comparisons,
a teacher served in a thread and brute-force references. Plain functions and constants (the
fixtures stay in conftest.py), so that no test module imports another."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from opd import metrics as M
from opd.config.settings import build
from opd.config.training import TrainConfig, build_config
from opd.runtime import StepHook
from opd.teachers.server import ServeConfig, build_server
from tests.tiny_models import ARCHITECTURES

# -- two processes -------------------------------------------------------------------------------
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
          "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "--main_process_port", "0"]  # a free port: other launches may run beside this one
"""`accelerate launch` of 2 processes; on a machine without GPUs they run on the CPU over gloo."""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def cli_args(settings: dict) -> list[str]:
    """`python -m opd train` with every setting as a --set."""
    args = ["-m", "opd", "train"]
    for key, value in settings.items():
        args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return args


# -- runs on the tiny pair ----------------------------------------------------------------------
TINY_RUN = {"max_steps": 6, "prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 8,
            "lr": 1e-3, "save_every": 2, "objective.k": 4, "measure_k": 4, "progress": False}
"""The tiny pair's standard run: 6 steps of 4 prompts × 2 rollouts, a checkpoint every second."""


def tiny_settings(tiny_pair, out, **overrides) -> dict[str, Any]:
    """The settings of the standard run of the tiny pair into `out`, with `overrides`."""
    return {"student": str(tiny_pair["student"]), "teacher": str(tiny_pair["teacher"]),
            "prompts": str(tiny_pair["prompts"]), "out": str(out), **TINY_RUN, **overrides}


def tiny_config(tiny_pair, out, **overrides) -> TrainConfig:
    return build_config(tiny_settings(tiny_pair, out, **overrides))


def without_times(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in records]


class KillAt(StepHook):
    """Interrupts the run at one step, after it is logged (as a kill between checkpoints)."""

    def __init__(self, step):
        self.step = step

    def on_step(self, record):
        if record["step"] == self.step:
            raise KeyboardInterrupt
        return False


COLD = {"keep": "all", "samples_per_prompt": 2, "sft_steps": 3, "sft_batch_size": 4}
"""A cold start small enough for the tiny pair (its `cold_start` settings)."""


def select_args(tiny_pair, out, *extra) -> list[str]:
    """`opd select-prompts` on 8 of the tiny pair's prompts with 2-step trials."""
    return ["select-prompts", "--student", str(tiny_pair["student"]), "--teacher", str(tiny_pair["teacher"]),
            "--prompts", str(tiny_pair["prompts"]), "--out", str(out), "--num-prompts", "8",
            "--samples-per-prompt", "2",
            "--max-new-tokens", "6", "--k", "4", "--trial-steps", "2", "--trial-profile", "cpu-small",
            "--set", "trial_settings.prompts_per_step=2", "--set", "trial_settings.samples_per_prompt=2",
            "--set", "trial_settings.objective.k=4", "--set", "trial_settings.measure_k=4",
            "--no-progress", *extra]


# -- a served teacher ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(model: Path, port: int | None = None, **settings) -> Iterator[tuple[str, Any]]:
    """A teacher served in a thread of this process, stopped on exit; yields its URL and a
    function that stops it at once (returning when the port is closed)."""
    port = port or free_port()
    server = build_server(build(ServeConfig, {"model": str(model), "port": port, **settings}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(30)

    try:
        yield f"http://127.0.0.1:{port}", stop
    finally:
        stop()


def assert_records_close(local, remote, tolerance=1e-5) -> None:
    """Two runs' metrics equal but for wall times, floats within `tolerance`."""
    assert [r[M.STEP] for r in local] == [r[M.STEP] for r in remote]
    for left, right in zip(without_times(local), without_times(remote), strict=True):
        assert set(left) == set(right)
        for key, value in left.items():
            other = right[key]
            if key == M.BY_POSITION:
                for name, bins in value.items():
                    assert other[name] == pytest.approx(bins, abs=tolerance, nan_ok=True), name
            elif isinstance(value, float):
                assert other == pytest.approx(value, abs=tolerance, rel=tolerance), key
            else:
                assert other == value, key


def assert_close(local, served, path="", tolerance=1e-5) -> None:
    """Two JSON values equal, floats within `tolerance` (absolute and relative)."""
    if isinstance(local, dict):
        assert set(local) == set(served), path
        for key in local:
            assert_close(local[key], served[key], f"{path}.{key}", tolerance)
    elif isinstance(local, list):
        assert len(local) == len(served), path
        for i, (a, b) in enumerate(zip(local, served, strict=True)):
            assert_close(a, b, f"{path}[{i}]", tolerance)
    elif isinstance(local, float):
        assert served == pytest.approx(local, abs=tolerance, rel=tolerance, nan_ok=True), path
    else:
        assert served == local, path


# -- the architecture matrix --------------------------------------------------------------------
ARCHS = list(ARCHITECTURES)
IDEAL = {M.OVERLAP_RATIO: 1.0, M.ENTROPY_GAP: 0.0, M.REVERSE_KL: 0.0,
         M.OVERLAP_TOKEN_ADVANTAGE: 0.0, M.LOSS: 0.0}
"""What a twin teacher must show at step 1 (within TOLERANCE); also equal overlap masses."""
TOLERANCE = 1e-5


def step_config(student, teacher, prompts, out, **overrides) -> TrainConfig:
    """One step of 2 prompts × 2 rollouts."""
    settings = {"student": str(student), "teacher": str(teacher), "prompts": str(prompts),
                "out": str(out), "max_steps": 1, "prompts_per_step": 2,
                "samples_per_prompt": 2, "max_new_tokens": 8, "lr": 1e-3, "objective.k": 4,
                "measure_k": 4, "progress": False, **overrides}
    return build_config(settings)


def assert_ideal(record, tolerance=TOLERANCE) -> None:
    """The measures of a student against its byte-identical twin."""
    for name, want in IDEAL.items():
        assert record[name] == pytest.approx(want, abs=tolerance), name
    assert record[M.OVERLAP_MASS_STUDENT] == pytest.approx(record[M.OVERLAP_MASS_TEACHER],
                                                           abs=tolerance)
    assert record[M.STUDENT_ENTROPY] == pytest.approx(record[M.TEACHER_ENTROPY], abs=tolerance)


# -- brute-force references ---------------------------------------------------------------------
def random_log_probs(seed: int, n: int, v: int, ties: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    if ties:  # few distinct values: many exact ties inside and at the top-k boundary
        logits = logits.round()
    return logits.log_softmax(-1)


def brute_topk(row: list[float], k: int) -> set[int]:
    return set(sorted(range(len(row)), key=lambda v: (-row[v], v))[:k])
