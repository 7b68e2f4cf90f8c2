"""Experiment trackers: TensorBoard, Weights & Biases, MLflow and trackio, as step hooks.

`report_to: [tensorboard, mlflow]` (any subset of `TRACKERS`; none by default) adds one hook
per tracker. Each is fed from the metrics schema (`opd.metrics`), the same record that
metrics.jsonl gets, under the same names:
- every numeric key of the step's record (loss, the measures, lengths, times, accuracy …) as a
  scalar at its step, and with several teachers each teacher's measures as
  `by_teacher/<name>/<measure>`;
- each by-position measure as a histogram whose x axis is the response position (one bucket per
  position bin, bounded by the bin edges in tokens; its height is the measure there, 0 for an
  empty bin) — TensorBoard, W&B and trackio — and, in MLflow, which has no histograms, as one
  table (`by_position.json`: step, measure, bin, first and last position, value) at the end;
- the live monitor's alerts as alerts (W&B, trackio), tags (MLflow) or text (TensorBoard);
- the run's config (TensorBoard text, W&B / trackio config, MLflow params) when the run opens;
- the run report's figures (curves.png, entropy_heatmap.png), the summary and the final
  accuracy when it ends.

Where each tracker writes: TensorBoard to OUT/tensorboard; MLflow to MLFLOW_TRACKING_URI, else a
file store in OUT/mlruns; W&B under OUT/wandb (offline with WANDB_MODE=offline); trackio to its
local store (TRACKIO_DIR). A resumed run continues the same tracker run (the ids are kept in
OUT/trackers.json). Only the main process logs. A tracker that fails while logging stops with
one warning; training goes on.

The packages are optional extras: `require` stops a run at its start, before any model loads,
with one line naming the extra to install.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from opd import metrics as M
from opd.config.choices import TRACKERS
from opd.config.settings import flatten, to_dict
from opd.config.training import TrainConfig
from opd.errors import OPDError
from opd.io import fmt, write_text_atomic
from opd.run.folder import SUMMARY_FILE, RunFolder
from opd.runtime import StepHook, is_installed, is_main_process
from opd.step.measures import position_bin_edges
from opd.version import __version__

MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
"""The module each tracker needs; its extra has the tracker's name (`opd[mlflow]`)."""
NOT_SCALARS = {M.STEP, M.BY_POSITION, M.BY_TEACHER, M.ALERTS}



def require(names: Sequence[str]) -> None:
    """Stop with one line naming the extra(s) when a tracker in `names` is not installed."""
    missing = [name for name in names if not is_installed(MODULES[name])]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise OPDError(f"report_to: {' and '.join(missing)} {verb} not installed; "
                       f"pip install \"opd[{','.join(missing)}]\"")


def tracker_hooks(config: TrainConfig) -> list[StepHook]:
    """One hook per tracker of `config.report_to`, after checking they are installed."""
    require(config.report_to)
    return [CLASSES[name](config) for name in config.report_to]


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's numeric keys (the schema's scalars), by their metrics.jsonl names, and with
    several teachers each teacher's measures as `by_teacher/<name>/<measure>`."""
    def numeric(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    values = {key: float(value) for key, value in record.items()
              if key in M.SCHEMA and key not in NOT_SCALARS and numeric(value)}
    for name, measures in (record.get(M.BY_TEACHER) or {}).items():
        values.update({f"{M.BY_TEACHER}/{name}/{key}": float(value)
                       for key, value in measures.items() if numeric(value)})
    return values


def alert_text(alert: Mapping[str, Any]) -> str:
    evidence = ", ".join(f"{k} {fmt(v, '.4g')}" for k, v in alert.get("evidence", {}).items())
    return (f"step {alert.get('step')}: {alert.get('cause')} Recipe: {alert.get('recipe')}"
            + (f" (evidence: {evidence})" if evidence else ""))


class Tracker(StepHook, abc.ABC):
    """What every tracker shares: opening lazily at the first step (so that a run that fails
    at its start leaves no tracker run), the schema → values mapping, the end of the run, and
    a failure that stops the tracker, not the training. Subclasses write."""

    name = ""

    def __init__(self, config: TrainConfig) -> None:
        require([self.name])
        self.config = config
        self.out = Path(config.out)
        self.run_name = config.run_name or self.out.resolve().name
        starts = position_bin_edges(config.max_new_tokens, config.position_bins)
        self.bin_edges = [*starts, config.max_new_tokens]
        """Bin boundaries in tokens: bin i covers positions [edges[i], edges[i+1])."""
        self.active = self.failed = False
        self.last_step = 0

    # -- the hook ----------------------------------------------------------------------------
    def on_step(self, record: Mapping[str, Any]) -> bool:
        if is_main_process() and not self.failed:
            self._guard(self._step, record)
        return False

    def on_end(self, summary: dict[str, Any]) -> None:
        if is_main_process() and not self.failed:
            self._guard(self._end, summary)

    def _step(self, record: Mapping[str, Any]) -> None:
        step = int(record[M.STEP])
        self._open(step)
        by_position = {name: [0.0 if v is None else float(v) for v in values]
                       for name, values in (record.get(M.BY_POSITION) or {}).items()}
        self.log_step(step, scalars(record), by_position)
        for alert in record.get(M.ALERTS) or []:
            self.log_alert(step, alert)
        self.last_step = step

    def _end(self, summary: dict[str, Any]) -> None:
        self._open(int(summary.get("steps") or 0) + 1)
        self.last_step = max(self.last_step, int(summary.get("steps") or 0))
        records = M.read(self.out)
        final = scalars(records[-1]) if records else {}
        final.update({k: float(summary[k]) for k in ("initial_accuracy", "final_accuracy")
                      if isinstance(summary.get(k), int | float)})
        figures = [f for f in RunFolder(self.out).report_figures if f.exists()]
        self.log_end(summary, final, figures, records)
        self.close()
        self.active = False

    def _open(self, first_step: int) -> None:
        if self.active:
            return
        path = RunFolder(self.out).tracker_ids
        ids = json.loads(path.read_text()) if path.exists() else {}
        opened = self.open(first_step, ids.get(self.name))
        if opened is not None and opened != ids.get(self.name):
            ids[self.name] = opened
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(ids, indent=2))
        self.active = True

    def _guard(self, action: Any, argument: Any) -> None:
        try:
            action(argument)
        except Exception as err:
            self.failed = True
            from tqdm.auto import tqdm

            tqdm.write(f"opd: the {self.name} tracker stopped logging ({type(err).__name__}: "
                       f"{' '.join(str(err).split())[:300]}); training goes on")
            with contextlib.suppress(Exception):
                self.close()

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.config)

    def histogram(self, values: Sequence[float]) -> tuple[list[float], list[int]]:
        """(heights, boundaries) of a by-position measure: one bucket per position bin."""
        return list(values), self.bin_edges[: len(values) + 1]

    # -- what each tracker writes ------------------------------------------------------------
    @abc.abstractmethod
    def open(self, first_step: int, saved: dict[str, Any] | None) -> dict[str, Any] | None:
        """Start (or, with `saved` ids from a run being resumed, continue) the tracker run;
        returns the ids to keep for a resume."""
        ...

    @abc.abstractmethod
    def log_step(self, step: int, values: dict[str, float], by_position: dict[str, list[float]]) -> None:
        ...

    @abc.abstractmethod
    def log_alert(self, step: int, alert: Mapping[str, Any]) -> None:
        ...

    @abc.abstractmethod
    def log_end(self, summary: dict[str, Any], final: dict[str, float], figures: list[Path],
                records: list[dict[str, Any]]) -> None:
        ...

    @abc.abstractmethod
    def close(self) -> None:
        ...


class TensorBoardTracker(Tracker):
    """Event files in OUT/tensorboard (`tensorboard --logdir OUT/tensorboard`). A resumed run
    purges the steps it logs again."""

    name = "tensorboard"
    writer: Any = None

    def open(self, first_step: int, saved: dict[str, Any] | None) -> dict[str, Any] | None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(RunFolder(self.out).tensorboard),
                                    purge_step=first_step if saved else None)
        config = yaml.safe_dump(self.config_dict(), sort_keys=True)
        self.writer.add_text("config", "    " + config.replace("\n", "\n    "), first_step)
        return {"log_dir": str(RunFolder(self.out).tensorboard)}

    def log_step(self, step: int, values: dict[str, float], by_position: dict[str, list[float]]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        for name, raw in by_position.items():
            heights, edges = self.histogram(raw)
            self.writer.add_histogram_raw(
                f"{M.BY_POSITION}/{name}", min=edges[0], max=edges[-1], num=len(heights),
                sum=sum(heights), sum_squares=sum(h * h for h in heights),
                bucket_limits=edges[1:], bucket_counts=heights, global_step=step)

    def log_alert(self, step: int, alert: Mapping[str, Any]) -> None:
        self.writer.add_text(f"{M.ALERTS}/{alert.get('rule')}", alert_text(alert), step)

    def log_end(self, summary: dict[str, Any], final: dict[str, float], figures: list[Path],
                records: list[dict[str, Any]]) -> None:
        import matplotlib.image

        for path in figures:
            image = matplotlib.image.imread(str(path))[..., :3]
            self.writer.add_image(f"report/{path.stem}", image, self.last_step, dataformats="HWC")
        for key in ("initial_accuracy", "final_accuracy"):
            if key in final:
                self.writer.add_scalar(f"summary/{key}", final[key], self.last_step)
        text = json.dumps({k: v for k, v in summary.items() if k != "cold_start"}, indent=2)
        self.writer.add_text("summary", "    " + text.replace("\n", "\n    "), self.last_step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MLflowTracker(Tracker):
    """An MLflow run in experiment `project`: metrics by step, the config as params, alerts as
    tags, figures, report, summary and the by-position table as artifacts. The tracking URI is
    MLFLOW_TRACKING_URI, else a file store in OUT/mlruns."""

    name = "mlflow"
    client: Any = None
    run_id = ""

    def open(self, first_step: int, saved: dict[str, Any] | None) -> dict[str, Any] | None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow keeps its file store in maintenance mode behind this switch; opd's default
            # store is a plain folder in the run, readable with `mlflow ui --backend-store-uri`.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = RunFolder(self.out).mlflow.resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        if saved and saved.get("tracking_uri") == uri:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return saved
        experiment = self.client.get_experiment_by_name(self.config.project)
        experiment_id = (experiment.experiment_id if experiment
                         else self.client.create_experiment(self.config.project))
        run = self.client.create_run(experiment_id, run_name=self.run_name,
                                     tags={"opd.version": __version__, "opd.out": str(self.out)})
        self.run_id = run.info.run_id
        params = [Param(key, _param(value)) for key, value in flatten(self.config_dict()).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        return {"run_id": self.run_id, "tracking_uri": uri}

    def log_step(self, step: int, values: dict[str, float], by_position: dict[str, list[float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step)
                                                    for key, value in values.items()])

    def log_alert(self, step: int, alert: Mapping[str, Any]) -> None:
        self.client.set_tag(self.run_id, f"alert.{alert.get('rule')}", alert_text(alert)[:5000])

    def log_end(self, summary: dict[str, Any], final: dict[str, float], figures: list[Path],
                records: list[dict[str, Any]]) -> None:
        for path in figures:
            self.client.log_artifact(self.run_id, str(path), "report")
        report = RunFolder(self.out).report
        if report.exists():
            self.client.log_artifact(self.run_id, str(report), "report")
        self.client.log_dict(self.run_id, by_position_table(records, self.bin_edges),
                             "by_position.json")
        self.client.log_dict(self.run_id, _jsonable(summary), SUMMARY_FILE)
        for key in ("initial_accuracy", "final_accuracy"):
            if key in final:
                self.client.log_metric(self.run_id, key, final[key], step=self.last_step)
        self.client.set_terminated(self.run_id, "FINISHED")

    def close(self) -> None:
        self.client = None


class WandbTracker(Tracker):
    """A W&B run (project `project`, files under OUT/wandb): history by step with the
    by-position histograms, the config, alerts, the figures and the summary. WANDB_MODE=offline
    keeps it on disk (`wandb sync` uploads it later)."""

    name = "wandb"
    run: Any = None

    def open(self, first_step: int, saved: dict[str, Any] | None) -> dict[str, Any] | None:
        import wandb

        self.run = wandb.init(project=self.config.project, name=self.run_name, dir=str(self.out),
                              config=self.config_dict(), id=(saved or {}).get("id"),
                              resume="allow" if saved else None)
        return {"id": self.run.id}

    def log_step(self, step: int, values: dict[str, float], by_position: dict[str, list[float]]) -> None:
        import wandb

        payload: dict[str, Any] = dict(values)
        for name, raw in by_position.items():
            payload[f"{M.BY_POSITION}/{name}"] = wandb.Histogram(np_histogram=self.histogram(raw))
        self.run.log(payload, step=step)

    def log_alert(self, step: int, alert: Mapping[str, Any]) -> None:
        import wandb

        self.run.alert(title=f"opd: {alert.get('rule')} at step {step}", text=alert_text(alert),
                       level=wandb.AlertLevel.WARN)

    def log_end(self, summary: dict[str, Any], final: dict[str, float], figures: list[Path],
                records: list[dict[str, Any]]) -> None:
        import wandb

        if figures:
            self.run.log({f"report/{p.stem}": wandb.Image(str(p)) for p in figures},
                         step=self.last_step)
        self.run.summary.update({**final, "steps": summary.get("steps"),
                                 "stopped_early_at": summary.get("stopped_early_at")})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class TrackioTracker(Tracker):
    """A trackio run (project `project`) in its local store (TRACKIO_DIR, by default under the
    Hugging Face cache; `trackio show` opens the dashboard): metrics, histograms, config,
    alerts, figures."""

    name = "trackio"
    run: Any = None

    def open(self, first_step: int, saved: dict[str, Any] | None) -> dict[str, Any] | None:
        import trackio

        self.run = trackio.init(project=self.config.project, name=self.run_name,
                                config=self.config_dict(), resume="allow" if saved else "never",
                                embed=False)
        return {"project": self.config.project, "name": self.run_name}

    def log_step(self, step: int, values: dict[str, float], by_position: dict[str, list[float]]) -> None:
        import trackio

        payload: dict[str, Any] = dict(values)
        for name, raw in by_position.items():
            payload[f"{M.BY_POSITION}/{name}"] = trackio.Histogram(np_histogram=self.histogram(raw))
        self.run.log(payload, step=step)

    def log_alert(self, step: int, alert: Mapping[str, Any]) -> None:
        import trackio

        self.run.alert(title=f"opd: {alert.get('rule')}", text=alert_text(alert),
                       level=trackio.AlertLevel.WARN)

    def log_end(self, summary: dict[str, Any], final: dict[str, float], figures: list[Path],
                records: list[dict[str, Any]]) -> None:
        import trackio

        payload: dict[str, Any] = {f"report/{p.stem}": trackio.Image(str(p)) for p in figures}
        payload.update({f"summary/{k}": v for k, v in final.items() if k.endswith("accuracy")})
        if payload:
            self.run.log(payload, step=self.last_step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


CLASSES: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker,
                                     "mlflow": MLflowTracker, "trackio": TrackioTracker}
assert tuple(CLASSES) == TRACKERS


def by_position_table(records: Sequence[Mapping[str, Any]], edges: Sequence[int]) -> dict[str, Any]:
    """Every by-position value of a run as a table (MLflow's `{columns, data}` JSON): step,
    measure, bin, its first and last response position, value (None for an empty bin)."""
    rows = []
    for record in records:
        for name, values in (record.get(M.BY_POSITION) or {}).items():
            for i, value in enumerate(values):
                rows.append([record[M.STEP], name, i, edges[i], edges[i + 1] - 1, value])
    return {"columns": ["step", "measure", "bin", "first_position", "last_position", "value"],
            "data": rows}


def _param(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))

