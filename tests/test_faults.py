"""Faults during a run (issue 14): a SIGKILL at any point, a full disk, a damaged checkpoint,
non-finite losses. The bar for each: the run resumes from its last complete checkpoint and ends
with exactly the metrics of the uninterrupted run; no checkpoint counts as complete unless all
its files are; metrics.jsonl never holds a partial line after a resume. Checkpoints hold no
pickles, and no model's code runs unless asked.

Kills at a chosen point run the loop in a child (forked from a fresh forkserver) that SIGKILLs
itself there (a real kill: no `finally`, no flush); the soak test kills `python -m opd train`
processes at seeded random moments.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

import opd
import opd.errors
import opd.metrics
import opd.models.loading
import opd.run.checkpoints
from opd import metrics as M
from opd.cli import main
from opd.config.training import build_config
from opd.run.checkpoints import checkpoint_step, complete_checkpoints, rng_state, set_rng_state
from opd.run.loop import Trainer, run_training
from tests.test_train import KillAt, without_times

train_module = sys.modules["opd.run.loop"]
"""The module: `opd.run.loop` is the API function of the same name."""

SETTINGS = {"max_steps": 6, "prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 8,
            "lr": 1e-3, "save_every": 2, "objective.k": 4, "measure_k": 4, "progress": False}


def settings(tiny_pair, out, **overrides) -> dict:
    return {"student": str(tiny_pair["student"]), "teacher": str(tiny_pair["teacher"]),
            "prompts": str(tiny_pair["prompts"]), "out": str(out), **SETTINGS, **overrides}


def config(tiny_pair, out, **overrides):
    return build_config(settings(tiny_pair, out, **overrides))


def cli_args(tiny_pair, out, **overrides):
    settings = {**SETTINGS, **overrides}
    args = ["train", "--student", str(tiny_pair["student"]), "--teacher", str(tiny_pair["teacher"]),
            "--prompts", str(tiny_pair["prompts"]), "--out", str(out)]
    for key, value in settings.items():
        args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return args


def metrics_of(out) -> str:
    """The run's metrics without wall times, as one string (NaN compares equal to NaN)."""
    return json.dumps(without_times(M.read(out)))


def assert_clean(out: Path) -> None:
    """Every line of metrics.jsonl is whole, every checkpoint folder under its name complete."""
    lines = (out / M.METRICS_FILE).read_text().splitlines()
    assert all(json.loads(line) for line in lines), "a partial line in metrics.jsonl"
    folders = [p for p in (out / "checkpoints").glob("step-*") if "." not in p.name]
    assert folders == [] or sorted(folders) == complete_checkpoints(out)


@pytest.fixture(scope="module")
def reference(tiny_pair, tmp_path_factory) -> Callable[..., str]:
    """The uninterrupted run's metrics for a set of overrides (each run once)."""
    cache: dict[str, str] = {}

    def get(**overrides) -> str:
        key = json.dumps(overrides, sort_keys=True)
        if key not in cache:
            out = tmp_path_factory.mktemp("reference")
            run_training(config(tiny_pair, out / "run", **overrides))
            cache[key] = metrics_of(out / "run")
        return cache[key]

    return get


# -- SIGKILL at a chosen point ------------------------------------------------------------------
def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def on_call(owner: object, name: str, number: int, before: Callable[..., None] = lambda *a, **k: die(),
            after: bool = False) -> None:
    """Make the `number`-th call of `owner.name` die (`before` it runs, or right after)."""
    real, calls = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == number and not after:
            before(*args, **kwargs)
        result = real(*args, **kwargs)
        if calls[0] == number and after:
            die()
        return result

    setattr(owner, name, wrapper)


def half_a_line(path, line):
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line[: len(line) // 2])
        handle.flush()
    die()


def half_a_file(obj, path, *args, **kwargs):
    torch.save(obj, path)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    die()


def half_deleted(path, *args, **kwargs):
    if str(path).endswith(".old") and Path(path).is_dir():
        next(p for p in Path(path).iterdir() if p.is_file()).unlink()
        die()


KILL_POINTS: dict[str, Callable[[], None]] = {
    "in the rollouts of step 3": lambda: on_call(train_module, "generate", 3),
    "in the update of step 3 (after backward, before the optimizer step)":
        lambda: on_call(torch.nn.utils, "clip_grad_norm_", 3),
    "half-way through the metrics line of step 3": lambda: on_call(
        opd.metrics, "_append_line", 3, before=half_a_line),
    "half-way through optimizer.pt of checkpoint 4": lambda: on_call(
        opd.run.checkpoints.torch, "save", 3, before=half_a_file),
    "after checkpoint 4's files, before its manifest": lambda: on_call(
        opd.run.checkpoints, "_write_manifest", 2),
    "after checkpoint 4's manifest, before its rename": lambda: on_call(
        opd.run.checkpoints, "_write_manifest", 2, after=True),
    "half-way through deleting checkpoint 2": lambda: setattr(
        opd.run.checkpoints.shutil, "rmtree", _rmtree_dying_on_old),
    "in the evaluation at the end": lambda: on_call(train_module, "evaluate", 2),
}
"""Where a kill lands → how the forked child arranges to die there."""

_real_rmtree = opd.run.checkpoints.shutil.rmtree


def _rmtree_dying_on_old(path, *args, **kwargs):
    half_deleted(path)
    return _real_rmtree(path, *args, **kwargs)


MORE_KILLS: dict[str, Callable[[], None]] = {
    "in the rollouts of step 4": lambda: on_call(train_module, "generate", 4),
    "while a resume cuts metrics.jsonl back": lambda: on_call(
        opd.metrics, "write_jsonl_atomic", 1, before=lambda path, rows: (list(rows), die())),
}


def _killed_run(point: str, values: dict, resume: bool, threads: int) -> None:
    """A child's body: arrange to die at `point`, then train (the kill ends it), with the
    parent's thread count (another count sums floats in another order)."""
    torch.set_num_threads(threads)
    tqdm.set_lock(threading.RLock())  # not a named semaphore, which a killed child leaks
    {**KILL_POINTS, **MORE_KILLS}[point]()
    run_training(build_config(values), resume=resume)


@pytest.fixture(scope="module")
def children():
    """Children forked from a fresh server that has only imported this module: a fork of the
    test process itself could inherit held locks and thread pools from earlier tests."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def run_and_die(children, point: str, values: dict, resume: bool = False) -> None:
    """Train in a child that SIGKILLs itself at `point`; it must end by that signal."""
    process = children.Process(target=_killed_run,
                               args=(point, values, resume, torch.get_num_threads()))
    process.start()
    process.join(timeout=180)
    if process.is_alive():
        process.kill()
        pytest.fail(f"the child did not reach {point!r}")
    assert process.exitcode == -signal.SIGKILL, process.exitcode


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_kill_at_any_point_resumes_to_the_uninterrupted_metrics(tiny_pair, tmp_path, reference,
                                                                  children, point):
    overrides = {"eval_prompts": str(tiny_pair["prompts"]), "eval_temperature": 0.0}
    out = tmp_path / "run"
    run_and_die(children, point, settings(tiny_pair, out, **overrides))
    if "metrics line" in point:  # the kill really left half a line
        assert not (out / M.METRICS_FILE).read_text().endswith("\n")
    run_training(config(tiny_pair, out, **overrides), resume=True)
    assert metrics_of(out) == reference(**overrides)
    assert_clean(out)


def test_a_kill_while_resuming_loses_nothing(tiny_pair, tmp_path, reference, children):
    """Killed once mid-run, then again while the resume cuts metrics.jsonl back."""
    out = tmp_path / "run"
    run_and_die(children, "in the rollouts of step 4", settings(tiny_pair, out))
    run_and_die(children, "while a resume cuts metrics.jsonl back", settings(tiny_pair, out),
                resume=True)
    assert [r[M.STEP] for r in M.read(out)] == [1, 2, 3]  # untouched by the killed resume
    run_training(config(tiny_pair, out), resume=True)
    assert metrics_of(out) == reference()
    assert_clean(out)


# -- damaged checkpoints ------------------------------------------------------------------------
def _cut(name):
    def damage(checkpoint: Path) -> None:
        data = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(data[: len(data) // 2])
    return damage


DAMAGES: dict[str, Callable[[Path], None]] = {
    "model.safetensors cut short": _cut("model.safetensors"),
    "optimizer.pt missing": lambda c: (c / "optimizer.pt").unlink(),
    "rng.json cut short": _cut("rng.json"),
    "manifest.json missing": lambda c: (c / "manifest.json").unlink(),
    "manifest.json damaged": lambda c: (c / "manifest.json").write_text("{"),
    "trainer_state.json missing": lambda c: (c / "trainer_state.json").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_never_resumed_from(tiny_pair, tmp_path, reference, capsys, damage):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # checkpoints 2 and 4 written, step 5 logged
        run_training(config(tiny_pair, out), hooks=[KillAt(6)])
    newest = out / "checkpoints" / "step-000004"
    DAMAGES[damage](newest)
    assert [c.name for c in complete_checkpoints(out)] == ["step-000002"]
    capsys.readouterr()
    run_training(config(tiny_pair, out), resume=True)
    assert "step-000004 is incomplete" in capsys.readouterr().out
    assert metrics_of(out) == reference()
    assert_clean(out)


def test_a_run_whose_only_checkpoint_is_damaged_is_not_started_over(tiny_pair, tmp_path, capsys):
    """Resuming from step 0 would drop the run's metrics: refuse in one line instead."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # checkpoint 2 written, step 3 logged
        run_training(config(tiny_pair, out), hooks=[KillAt(4)])
    DAMAGES["manifest.json missing"](out / "checkpoints" / "step-000002")
    before = (out / M.METRICS_FILE).read_text()
    capsys.readouterr()
    assert main([*cli_args(tiny_pair, out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no complete checkpoint" in err and "step-000002" in err
    assert (out / M.METRICS_FILE).read_text() == before


def test_a_checkpoint_damaged_without_changing_sizes_is_named(tiny_pair, tmp_path, reference, capsys):
    """Same size, other bytes: the manifest cannot see it, loading does; one line says which
    file and how to go back one checkpoint."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_training(config(tiny_pair, out), hooks=[KillAt(6)])
    optimizer = out / "checkpoints" / "step-000004" / "optimizer.pt"
    optimizer.write_bytes(b"\0" * optimizer.stat().st_size)
    capsys.readouterr()
    assert main([*cli_args(tiny_pair, out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "optimizer.pt is damaged" in err and "delete" in err
    shutil.rmtree(optimizer.parent)
    assert main([*cli_args(tiny_pair, out), "--resume"]) == 0
    assert metrics_of(out) == reference()


# -- a full disk --------------------------------------------------------------------------------
def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_checkpointing_stops_with_one_line(tiny_pair, tmp_path, reference,
                                                              capsys, monkeypatch):
    out = tmp_path / "run"
    calls = [0]
    real_save = opd.run.checkpoints.torch.save

    def save(obj, path, *args, **kwargs):  # checkpoint 4's optimizer.pt: the disk is full
        calls[0] += 1
        if calls[0] == 3:
            Path(path).write_bytes(b"partial")
            no_space()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(opd.run.checkpoints.torch, "save", save)
    assert main(cli_args(tiny_pair, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "No space left on device" in err and "--resume" in err
    assert "the last complete one is step-000002" in err
    assert [c.name for c in complete_checkpoints(out)] == ["step-000002"]
    assert not list((out / "checkpoints").glob("*.tmp"))
    monkeypatch.undo()
    assert main([*cli_args(tiny_pair, out), "--resume"]) == 0
    assert metrics_of(out) == reference()
    assert_clean(out)


def test_a_full_disk_while_logging_stops_with_one_line(tiny_pair, tmp_path, reference, capsys,
                                                        monkeypatch):
    out = tmp_path / "run"
    real, calls = opd.metrics._append_line, [0]

    def append(path, line):  # step 3: half the line reaches the disk, then it is full
        calls[0] += 1
        if calls[0] == 3:
            real(path, line[: len(line) // 2])
            no_space()
        return real(path, line)

    monkeypatch.setattr(opd.metrics, "_append_line", append)
    assert main(cli_args(tiny_pair, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "metrics: could not append step 3" in err
    monkeypatch.undo()
    assert main([*cli_args(tiny_pair, out), "--resume"]) == 0
    assert metrics_of(out) == reference()
    assert_clean(out)


def test_a_full_disk_at_the_end_is_one_line_and_resumable(tiny_pair, tmp_path, reference, capsys,
                                                           monkeypatch):
    out = tmp_path / "run"
    real = train_module.write_text_atomic
    monkeypatch.setattr(train_module, "write_text_atomic", lambda path, text: no_space()
                        if path.name == "summary.json" else real(path, text))
    assert main(cli_args(tiny_pair, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "No space left on device" in err
    monkeypatch.undo()
    assert main([*cli_args(tiny_pair, out), "--resume"]) == 0
    assert metrics_of(out) == reference() and (out / "summary.json").exists()


# -- non-finite losses --------------------------------------------------------------------------
def test_non_finite_losses_are_skipped_the_same_way_after_a_resume(tiny_pair, tmp_path, monkeypatch):
    bad, current = {2, 5}, {"step": 0}
    real_step, real_score = Trainer.train_step, train_module.score

    def train_step(self, step):
        current["step"] = step
        return real_step(self, step)

    def score(*args, **kwargs):
        scores = real_score(*args, **kwargs)
        if current["step"] in bad:
            scores.loss = scores.loss * float("nan")
        return scores

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(train_module, "score", score)
    run_training(config(tiny_pair, tmp_path / "whole"))
    with pytest.raises(KeyboardInterrupt):
        run_training(config(tiny_pair, tmp_path / "killed"), hooks=[KillAt(6)])
    run_training(config(tiny_pair, tmp_path / "killed"), resume=True)
    whole = M.read(tmp_path / "whole")
    assert [r[M.SKIPPED_STEPS] for r in whole] == [0, 1, 1, 1, 2, 2]
    assert str(whole[1][M.LOSS]) == "nan"
    assert metrics_of(tmp_path / "killed") == metrics_of(tmp_path / "whole")


# -- the monitor's history ----------------------------------------------------------------------
def test_a_resumed_run_fires_the_alerts_of_the_uninterrupted_one(tiny_pair, tmp_path):
    """The pattern-mismatch alert fires at step 16 (after two windows of 8); a run resumed from
    step 15 must still see steps 1–15."""
    slow = {"max_steps": 17, "save_every": 3, "lr": 1e-4}
    run_training(config(tiny_pair, tmp_path / "whole", **slow))
    assert [r[M.STEP] for r in M.read(tmp_path / "whole") if M.ALERTS in r] == [16]
    with pytest.raises(KeyboardInterrupt):
        run_training(config(tiny_pair, tmp_path / "killed", **slow), hooks=[KillAt(17)])
    run_training(config(tiny_pair, tmp_path / "killed", **slow), resume=True)
    assert metrics_of(tmp_path / "killed") == metrics_of(tmp_path / "whole")


# -- untrusted files ----------------------------------------------------------------------------
def test_rng_state_is_plain_data_and_restores_the_same_streams():
    import numpy as np

    state = json.loads(json.dumps(rng_state()))  # survives JSON exactly
    first = (random_draws := lambda: (random.random(), float(np.random.rand()),
                                      float(torch.rand(1))))()
    set_rng_state(state)
    assert random_draws() == first


def test_checkpoints_hold_no_pickles_and_load_with_weights_only(tiny_pair, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_training(config(tiny_pair, out), hooks=[KillAt(4)])
    checkpoint = complete_checkpoints(out)[-1]
    for file in checkpoint.iterdir():
        if file.suffix in {".pt", ".bin", ".pkl", ".pickle"}:
            torch.load(file, weights_only=True)  # tensors and plain values only
    json.loads((checkpoint / "rng.json").read_text())
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real(*a, **k))
    run_training(config(tiny_pair, out), resume=True)
    assert loads and all(flag is True for flag in loads)


def test_remote_code_stays_off_unless_asked_for_every_model_loaded(tiny_pair, tmp_path, monkeypatch):
    seen: list[tuple[str, bool]] = []
    for owner in (opd.models.loading.AutoModelForCausalLM, opd.models.loading.AutoTokenizer):
        real = owner.from_pretrained

        def spy(path, *args, _real=real, _name=owner.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(owner, "from_pretrained", spy)
    base = cli_args(tiny_pair, tmp_path / "a", max_steps=1, kl_penalty=0.1)
    assert main(base) == 0
    assert len(seen) == 5 and {flag for _, flag in seen} == {False}  # 2 tokenizers, 3 models
    seen.clear()
    assert main(["eval", "--model", str(tiny_pair["student"]), "--prompts",
                 str(tiny_pair["prompts"]), "--max-new-tokens", "2"]) == 0
    assert seen and {flag for _, flag in seen} == {False}
    seen.clear()
    assert main([*cli_args(tiny_pair, tmp_path / "b", max_steps=1), "--trust-remote-code"]) == 0
    assert seen and {flag for _, flag in seen} == {True}


# -- the soak -----------------------------------------------------------------------------------
SOAK = {"max_steps": 24, "save_every": 3, "lr": 1e-4}
"""Long enough for kills to land anywhere and for the monitor to fire (step 16)."""
KILLS = 5
"""Kills planned (fewer when a kill lands late and the run is nearly done)."""


@pytest.mark.slow
def test_soak_random_kills_end_in_the_uninterrupted_metrics(tiny_pair, tmp_path, reference):
    """`opd train` killed with SIGKILL at seeded random moments, resumed each time, ends with
    exactly the metrics of the uninterrupted run."""
    rng = random.Random(14)
    out = tmp_path / "soak"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(opd.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as the reference run here
    kills, resumes, deadline = 0, 0, time.monotonic() + 600  # a guard against a hang
    landed: list[str] = []
    while True:
        resume = ["--resume"] if out.exists() else []
        resumes += bool(resume)
        done = checkpoint_step(complete_checkpoints(out)[-1]) if complete_checkpoints(out) else 0
        launched = time.time_ns()
        process = subprocess.Popen([sys.executable, "-m", "opd", *cli_args(tiny_pair, out, **SOAK),
                                    *resume], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   env=env)
        last_target = SOAK["max_steps"] - 3  # room left for the kill to land before the end
        if kills < KILLS and done < last_target:
            # A step this process has to log itself (after it cut the file back to `done`),
            # then a moment into what follows: the next rollout, update, checkpoint or append.
            # A step takes ~20 ms on the tiny pair (a checkpoint every third step).
            target = rng.randint(done + 1, min(done + 6, last_target))
            delay = rng.uniform(0.0, 0.04)
            while process.poll() is None and _logged_step(out, launched) < target:
                assert time.monotonic() < deadline, "soak ran out of time"
                time.sleep(0.002)
            time.sleep(delay)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
                landed.append(f"target step {target} + {1000 * delay:.0f} ms: {_state(out)}")
        _, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL, err.decode()
    print("soak kills landed at:", *landed, sep="\n  ")
    assert kills >= 3 and resumes >= kills, landed
    assert metrics_of(out) == reference(**SOAK), landed
    assert any(M.ALERTS in r for r in M.read(out))
    assert_clean(out)


def _state(out: Path) -> str:
    """Where a kill left the run: steps logged, a cut line, checkpoints whole and partial."""
    text = (out / M.METRICS_FILE).read_text() if (out / M.METRICS_FILE).exists() else ""
    folders = sorted(p.name for p in (out / "checkpoints").glob("step-*")) \
        if (out / "checkpoints").exists() else []
    cut = " + a cut line" if text and not text.endswith("\n") else ""
    return f"{text.count(chr(10))} lines{cut}; checkpoints {folders}"


def _logged_step(out: Path, since: int) -> int:
    """The last step in metrics.jsonl, counting only a file written since `since` (ns)."""
    path = out / M.METRICS_FILE
    try:
        if path.stat().st_mtime_ns < since:
            return 0
        return max((r[M.STEP] for r in M.read(out)), default=0)
    except (OSError, ValueError, opd.errors.OPDError):  # not there yet, or a line being written
        return 0
