"""Experiment trackers, each run offline against a local store and read back: TensorBoard event
files, MLflow's file store, W&B's offline run file, trackio's local database. The values read
back are the ones metrics.jsonl holds, under the schema's names."""

from __future__ import annotations

import glob
import json
import math
import struct
import sys
import time
import uuid
from pathlib import Path

import pytest

import opd
from opd import metrics as M
from opd.cli import main
from opd.config.training import build_config
from opd.errors import OPDError
from opd.run.folder import RunFolder
from opd.run.report import write_run_report
from opd.run.trackers import CLASSES, require
from opd.runtime import StepHook

EDGES = [0, 4, 8, 12]  # position_bins 3 over max_new_tokens 12
ALERT = {"rule": "pattern-mismatch", "step": 2, "evidence": {M.OVERLAP_RATIO: 0.12},
         "cause": "the teacher's top tokens rarely overlap the student's", "recipe": "opd cold-start"}


def make_record(step: int) -> dict:
    """A step's record with every key the schema declares for a run with a teacher."""
    record = {M.STEP: step, M.LOSS: 1.0 / step, M.GRAD_NORM: 0.5 + step, M.LR: 1e-4,
              M.RESPONSE_LENGTH: 6.0 + step, M.TRUNCATION_RATE: 0.25, M.TRAIN_REWARD: None,
              M.SKIPPED_STEPS: 0, M.TIME_ROLLOUT: 0.1, M.TIME_SCORE: 0.2, M.TIME_UPDATE: 0.3}
    for i, name in enumerate(M.TOKEN_MEASURES):
        record[name] = 0.1 * (i + 1) + 0.01 * step
    record[M.BY_POSITION] = {name: [0.1 * step + i, None, 0.3 - i] for i, name in enumerate(M.TOKEN_MEASURES)}
    record[M.BY_TEACHER] = {"math": {M.REVERSE_KL: 0.2 * step, M.OVERLAP_RATIO: None},
                            "code": {M.REVERSE_KL: 0.3 * step, M.OVERLAP_RATIO: 0.5}}
    if step == 2:
        record[M.ALERTS] = [ALERT]
    if step == 3:
        record[M.ACCURACY] = 0.75
    return record


@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    """Offline, local stores: W&B offline under the run, trackio in a temporary folder (read
    when trackio is first imported), no MLflow server."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if "trackio" not in sys.modules:
        monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    return tmp_path


def run_hook(name: str, out: Path) -> tuple[list[dict], dict]:
    """Feed one tracker three steps (an alert at step 2, accuracy at step 3) and the end."""
    config = build_config({"out": str(out), "max_new_tokens": 12, "position_bins": 3,
                           "project": f"opd-test-{uuid.uuid4().hex[:8]}", "report_to": [name],
                           "eval_prompts": "eval.jsonl"})
    hook = CLASSES[name](config)
    out.mkdir(parents=True)
    records = [make_record(step) for step in (1, 2, 3)]
    for record in records:
        M.append(out, record)
        assert hook.on_step(record) is False
    summary = {"steps": 3, "stopped_early_at": None, "initial_accuracy": 0.25, "final_accuracy": 0.75,
               "skipped_steps": 0, "final_checkpoint": None, "alerts": [ALERT]}
    (out / "summary.json").write_text(json.dumps(summary))
    write_run_report(out)
    hook.on_end(summary)
    assert not hook.failed
    return records, {"config": config, "ids": json.loads(RunFolder(out).tracker_ids.read_text())[name]}


def expected_scalars(record):
    return {k: v for k, v in record.items()
            if k not in {M.STEP, M.BY_POSITION, M.ALERTS} and isinstance(v, int | float)}


def teacher_scalars(record):
    """Each teacher's numeric measures under `by_teacher/<name>/<measure>` (None left out)."""
    return {f"{M.BY_TEACHER}/{name}/{key}": v for name, values in record[M.BY_TEACHER].items()
            for key, v in values.items() if v is not None}


def heights(values):
    return [0.0 if v is None else v for v in values]


def test_tensorboard_event_files_hold_the_records(tracker_env):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records, _ = run_hook("tensorboard", tracker_env / "run")
    events = EventAccumulator(str(tracker_env / "run" / "tensorboard"),
                              size_guidance={"scalars": 0, "histograms": 0, "tensors": 0, "images": 0})
    events.Reload()
    for key in expected_scalars(records[0]):
        logged = {e.step: e.value for e in events.Scalars(key)}
        want = {r[M.STEP]: r[key] for r in records if key in r}
        assert logged == pytest.approx(want, rel=1e-6), key
    assert [e.step for e in events.Scalars(M.ACCURACY)] == [3]
    teacher_tags = {t for t in events.Tags()["scalars"] if t.startswith(f"{M.BY_TEACHER}/")}
    assert teacher_tags == set(teacher_scalars(records[0]))
    for key in teacher_tags:
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx({r[M.STEP]: teacher_scalars(r)[key] for r in records}), key
    for name in M.TOKEN_MEASURES:
        for event, record in zip(events.Histograms(f"by_position/{name}"), records, strict=True):
            assert event.step == record[M.STEP]
            assert event.histogram_value.bucket == pytest.approx(heights(record[M.BY_POSITION][name]))
            assert list(event.histogram_value.bucket_limit) == EDGES[1:]
    tensors = events.Tags()["tensors"]
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "report_to:" in config_text and "max_new_tokens: 12" in config_text
    alert = events.Tensors("alerts/pattern-mismatch/text_summary")[0]
    assert alert.step == 2 and "opd cold-start" in alert.tensor_proto.string_val[0].decode()
    assert "summary/text_summary" in tensors
    assert {"report/curves", "report/entropy_heatmap"} <= set(events.Tags()["images"])
    assert events.Scalars("summary/final_accuracy")[0].value == 0.75


def test_mlflow_file_store_holds_the_records(tracker_env):
    from mlflow.tracking import MlflowClient

    records, info = run_hook("mlflow", tracker_env / "run")
    ids = info["ids"]
    assert ids["tracking_uri"] == (tracker_env / "run" / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    run = client.get_run(ids["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    for key in expected_scalars(records[0]):
        history = {m.step: m.value for m in client.get_metric_history(ids["run_id"], key)}
        assert history == pytest.approx({r[M.STEP]: r[key] for r in records}), key
    assert {m.step: m.value for m in client.get_metric_history(ids["run_id"], M.ACCURACY)} == {3: 0.75}
    assert run.data.metrics["final_accuracy"] == 0.75 and run.data.metrics["initial_accuracy"] == 0.25
    params = run.data.params
    assert params["max_new_tokens"] == "12" and params["objective.k"] == "16"
    assert json.loads(params["report_to"]) == ["mlflow"]
    assert "opd cold-start" in run.data.tags["alert.pattern-mismatch"]
    artifacts = {a.path for a in client.list_artifacts(ids["run_id"], "report")}
    assert artifacts == {"report/curves.png", "report/entropy_heatmap.png", "report/report.md"}
    table = json.loads(Path(client.download_artifacts(ids["run_id"], "by_position.json",
                                                      str(tracker_env / "dl"))).read_text())
    assert table["columns"] == ["step", "measure", "bin", "first_position", "last_position", "value"]
    rows = {(r[0], r[1], r[2]): r for r in table["data"]}
    assert len(rows) == 3 * len(M.TOKEN_MEASURES) * 3
    assert rows[(2, M.STUDENT_ENTROPY, 1)][3:] == [4, 7, None]
    assert rows[(3, M.OVERLAP_RATIO, 0)][5] == records[2][M.BY_POSITION][M.OVERLAP_RATIO][0]


def wandb_records(path: Path):
    """The records of a W&B run file (its LevelDB-style log: 7-byte header, then 32 KiB blocks
    of chunks with a 7-byte header: checksum, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    index, parts = 7, b""
    while index + 7 <= len(data):
        if 32768 - index % 32768 < 7:
            index += 32768 - index % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[index : index + 7])
        index += 7
        if (length == 0 and kind == 0) or index + length > len(data):
            break  # the end, or a chunk still being written
        chunk, index = data[index : index + length], index + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def finished_wandb_run(folder: Path, run_id: str, timeout: float = 60.0) -> list:
    """The records of an offline W&B run, once its service has written the exit record (the
    file is written by W&B's service process, after `finish` returns)."""
    import wandb

    wandb.teardown()
    deadline = time.monotonic() + timeout
    while True:
        paths = glob.glob(str(folder / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
        records = list(wandb_records(Path(paths[0]))) if paths else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_wandb_offline_run_holds_the_records(tracker_env):
    records, info = run_hook("wandb", tracker_env / "run")
    history, config, alerts, summary = {}, {}, [], {}
    for record in finished_wandb_run(tracker_env / "run", info["ids"]["id"]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "alert":
            alerts.append((record.alert.title, record.alert.text))
        elif kind == "summary":
            summary.update({item.key: json.loads(item.value_json) for item in record.summary.update
                            if item.key})
    for record in records:
        row = history[record[M.STEP]]
        for key, value in expected_scalars(record).items():
            assert row[key] == pytest.approx(value), key
        entropy = record[M.BY_POSITION][M.STUDENT_ENTROPY]
        assert row[f"by_position/{M.STUDENT_ENTROPY}/values"] == pytest.approx(heights(entropy))
        assert row[f"by_position/{M.STUDENT_ENTROPY}/bins"] == EDGES
    assert history[3]["report/curves/_type"] == "image-file"
    assert config["max_new_tokens"] == 12 and config["objective"]["k"] == 16
    assert alerts == [("opd: pattern-mismatch at step 2", alerts[0][1])] and "cold-start" in alerts[0][1]
    assert summary["final_accuracy"] == 0.75 and summary["steps"] == 3


def test_trackio_local_store_holds_the_records(tracker_env):
    import trackio

    records, info = run_hook("trackio", tracker_env / "run")
    project, name = info["ids"]["project"], info["ids"]["name"]
    logs = trackio.SQLiteStorage.get_logs(project, name)
    by_step: dict[int, dict] = {}
    for row in logs:
        by_step.setdefault(row["step"], {}).update(row)
    for record in records:
        row = by_step[record[M.STEP]]
        for key, value in expected_scalars(record).items():
            assert row[key] == pytest.approx(value), key
        histogram = row[f"by_position/{M.REVERSE_KL}"]
        assert histogram["values"] == pytest.approx(heights(record[M.BY_POSITION][M.REVERSE_KL]))
        assert histogram["bins"] == EDGES
    assert by_step[3]["report/curves"]["_type"] == "trackio.image"
    assert by_step[3]["summary/final_accuracy"] == 0.75
    (alert,) = trackio.SQLiteStorage.get_alerts(project, run_name=name)
    assert alert["title"] == "opd: pattern-mismatch" and alert["step"] == 2
    config = trackio.SQLiteStorage.get_run_config(project, name)
    assert config["max_new_tokens"] == 12 and config["report_to"] == ["trackio"]


def test_a_training_run_reports_to_tensorboard_and_mlflow(tiny_pair, tracker_env):
    """Done when: a run with report_to [tensorboard, mlflow] shows the measures in both."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tracker_env / "run"
    result = opd.train(student=str(tiny_pair["student"]), teacher=str(tiny_pair["teacher"]),
                       prompts=str(tiny_pair["prompts"]), out=str(out), max_steps=3,
                       prompts_per_step=2, samples_per_prompt=2, max_new_tokens=6, lr=1e-3,
                       objective={"k": 4}, measure_k=4, progress=False,
                       report_to=["tensorboard", "mlflow"], project="tiny")
    records = result.metrics()
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    ids = json.loads(RunFolder(out).tracker_ids.read_text())["mlflow"]
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    for key in (M.LOSS, M.OVERLAP_RATIO, M.ENTROPY_GAP, M.STUDENT_ENTROPY):
        want = {r[M.STEP]: r[key] for r in records}
        assert {e.step: e.value for e in events.Scalars(key)} == pytest.approx(want, rel=1e-6)
        history = client.get_metric_history(ids["run_id"], key)
        assert {m.step: m.value for m in history} == pytest.approx(want)
        assert math.isfinite(result.final_measures[key])
    assert client.get_experiment_by_name("tiny") is not None


def test_a_tracker_that_is_not_installed_stops_the_run_at_its_start(tiny_pair, tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(OPDError) as err:
        require(["tensorboard", "wandb"])
    assert str(err.value) == 'report_to: wandb is not installed; pip install "opd[wandb]"'
    monkeypatch.setitem(sys.modules, "trackio", None)
    both = r'wandb and trackio are not installed; pip install "opd\[wandb,trackio\]"'
    with pytest.raises(OPDError, match=both):
        require(["wandb", "trackio"])
    # Before any model loads: the student folder does not even exist.
    code = main(["train", "--student", str(tmp_path / "no-model"), "--prompts", str(tiny_pair["prompts"]),
                 "--out", str(tmp_path / "run"), "--report-to", "tensorboard,wandb"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        'opd train: error: report_to: wandb is not installed; pip install "opd[wandb]"']
    assert not (tmp_path / "run").exists()
    with pytest.raises(OPDError, match="report_to must be each one of"):
        build_config({"report_to": "tensorboard,neptune"})


class KillAt(StepHook):
    def __init__(self, step):
        self.step = step

    def on_step(self, record):
        if record[M.STEP] == self.step:
            raise KeyboardInterrupt
        return False


def test_a_resumed_run_continues_its_tracker_runs(tiny_pair, tracker_env):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tracker_env / "run"
    settings = {"student": str(tiny_pair["student"]), "teacher": str(tiny_pair["teacher"]),
                "prompts": str(tiny_pair["prompts"]), "out": str(out), "max_steps": 4,
                "save_every": 2, "prompts_per_step": 2, "samples_per_prompt": 2,
                "max_new_tokens": 6, "lr": 1e-3, "progress": False,
                "report_to": ["tensorboard", "mlflow"]}
    with pytest.raises(KeyboardInterrupt):  # step 3 is logged everywhere, the checkpoint is step 2
        opd.train(settings, hooks=[KillAt(4)])
    first = json.loads(RunFolder(out).tracker_ids.read_text())["mlflow"]["run_id"]
    result = opd.train(settings, resume=True)
    ids = json.loads(RunFolder(out).tracker_ids.read_text())["mlflow"]
    assert ids["run_id"] == first
    want = {r[M.STEP]: r[M.LOSS] for r in result.metrics()}
    assert sorted(want) == [1, 2, 3, 4]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars(M.LOSS)]
    assert [s for s, _ in logged] == [1, 2, 3, 4]  # the killed run's step 3 is purged
    assert dict(logged) == pytest.approx(want, rel=1e-6)
    history = MlflowClient(tracking_uri=ids["tracking_uri"]).get_metric_history(first, M.LOSS)
    assert {m.step: m.value for m in history} == pytest.approx(want)  # the re-run step 3 last
