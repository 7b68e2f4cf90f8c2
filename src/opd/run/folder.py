"""A run folder: the name of everything a run writes, and what `--resume` reads back.

    OUT/config.yaml                    the run's settings
    OUT/metrics.jsonl                  one record per step (`opd.metrics`)
    OUT/summary.json                   the summary, when the run ends
    OUT/report.md, curves.png, entropy_heatmap.png    the run report (`opd.run.report`)
    OUT/trackers.json                  the experiment trackers' run ids (`opd.run.trackers`),
    OUT/tensorboard/, OUT/mlruns/      and their local logs
    OUT/checkpoints/step-000010/       checkpoints (`opd.run.checkpoints`), complete when their
                                       manifest.json lists every file with its size
    OUT/model/                         the final model folder (`opd.run.cards`)

Every module asks a `RunFolder` for a path instead of spelling a name. Resuming picks the newest
complete checkpoint (a folder cut short by a kill is skipped, and said so) and cuts
metrics.jsonl back to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from tqdm.auto import tqdm

from opd import metrics as M
from opd.errors import OPDError
from opd.io import write_text_atomic

Resume = bool | Literal["auto"]
"""How a run treats its output folder: False starts a new run (refusing a folder that holds
one), True continues the run there from its last complete checkpoint (from step 0 when it has
none), "auto" continues it when it has a complete checkpoint and starts a new run when the
folder holds none (one command for a first launch and every relaunch)."""

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
CURVES_FIGURE = "curves.png"
ENTROPY_FIGURE = "entropy_heatmap.png"
TRACKER_IDS_FILE = "trackers.json"
TENSORBOARD_FOLDER = "tensorboard"
MLFLOW_FOLDER = "mlruns"
CHECKPOINTS_FOLDER = "checkpoints"
MODEL_FOLDER = "model"
"""The final model folder inside a run folder."""

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
RNG_FILE = "rng.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SHARDED_OPTIMIZER = "optimizer"
"""The folder of the sharded optimizer state (runs of several processes)."""
SETTINGS_FILE = "run_config.yaml"
"""The run's settings when the checkpoint was taken (what `--resume` compares with)."""
IN_FLIGHT_FILE = "rollouts_in_flight.pt"
"""The rollouts sampled ahead by older weights than the checkpoint's (max_staleness > 0)."""
CHECKPOINT_STATE = frozenset({OPTIMIZER_FILE, SHARDED_OPTIMIZER, SCHEDULER_FILE, RNG_FILE,
                              STATE_FILE, SETTINGS_FILE, MANIFEST_FILE, IN_FLIGHT_FILE})
"""Checkpoint files and folders that resume training and are not part of the model."""


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` is not complete (None when it is): no manifest, or a file it lists is
    missing or has another size."""
    try:
        manifest = json.loads((checkpoint / MANIFEST_FILE).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (cut short, or written by an older opd)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST_FILE} is damaged"
    for name, size in files.items():
        file = checkpoint / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, not {size}"
    if STATE_FILE not in files:
        return f"{MANIFEST_FILE} does not list {STATE_FILE}"
    return None


def checkpoint_step(checkpoint: Path) -> int:
    """The step a complete checkpoint was taken at."""
    return json.loads((checkpoint / STATE_FILE).read_text())["step"]


def checkpoint_settings(checkpoint: Path) -> dict[str, Any] | None:
    """The run's settings saved with `checkpoint` (None if it has none)."""
    file = checkpoint / SETTINGS_FILE
    if not file.exists():
        return None
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise OPDError(f"--resume: {file} is damaged; delete {checkpoint} to resume from the "
                       "checkpoint before it")
    return data


class RunFolder:
    """The paths of one run folder (nothing is read or written by making one)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / M.METRICS_FILE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def report(self) -> Path:
        return self.root / REPORT_FILE

    @property
    def curves(self) -> Path:
        return self.root / CURVES_FIGURE

    @property
    def entropy_heatmap(self) -> Path:
        return self.root / ENTROPY_FIGURE

    @property
    def report_figures(self) -> tuple[Path, Path]:
        return self.curves, self.entropy_heatmap

    @property
    def tracker_ids(self) -> Path:
        return self.root / TRACKER_IDS_FILE

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_FOLDER

    @property
    def mlflow(self) -> Path:
        """The local MLflow store (when no tracking URI is set)."""
        return self.root / MLFLOW_FOLDER

    @property
    def model(self) -> Path:
        return self.root / MODEL_FOLDER

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_FOLDER

    def checkpoint(self, step: int) -> Path:
        """The folder of the checkpoint taken at `step`."""
        return self.checkpoints / f"step-{step:06d}"

    def _step_folders(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.glob("step-*") if p.is_dir() and "." not in p.name)

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a `.tmp` folder left by a kill, or a folder whose
        files do not match its manifest, is left out)."""
        return [p for p in self._step_folders() if checkpoint_problem(p) is None]

    def incomplete_checkpoints(self) -> list[tuple[Path, str]]:
        """Checkpoint folders under their final name that are not complete, with the reason."""
        found = [(p, checkpoint_problem(p)) for p in self._step_folders()]
        return [(p, problem) for p, problem in found if problem is not None]

    def resume_point(self, resume: Resume) -> Path | None:
        """The checkpoint to resume from (None: start at step 0), after refusing to overwrite
        an existing run; reads, never writes."""
        checkpoints, damaged = self.complete_checkpoints(), self.incomplete_checkpoints()
        has_run = self.metrics.exists() or bool(checkpoints) or bool(damaged)
        if resume == "auto" and has_run and not checkpoints:
            raise OPDError(
                f"--resume auto: {str(self.root)!r} holds a run but no complete checkpoint to "
                "continue from; pass --resume to start that run over from step 0, or choose a "
                "new --out (nothing was changed)")
        if not resume:
            if has_run:
                raise OPDError(
                    f"out: {str(self.root)!r} already holds a run; pass --resume to continue it "
                    "or choose a new --out folder (nothing was changed)")
            return None
        last = checkpoints[-1] if checkpoints else None
        if last is None and damaged:
            folder, problem = damaged[-1]
            raise OPDError(
                f"--resume: no complete checkpoint in {str(self.root)!r} ({folder.name}: "
                f"{problem}); restore it, or delete {folder.parent} to start the run over "
                "(nothing was changed)")
        for folder, problem in damaged:
            if folder.name > last.name:
                tqdm.write(f"opd: {folder} is incomplete ({problem}); resuming from {last.name}")
        return last

    def saved_settings(self, checkpoint: Path) -> dict[str, Any]:
        """The settings the run had at `checkpoint`: its own copy, or config.yaml for a
        checkpoint written by an older opd."""
        saved = checkpoint_settings(checkpoint)
        if saved is not None:
            return saved
        try:
            saved = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            saved = None
        if not isinstance(saved, dict):
            raise OPDError(f"--resume: {self.config} is missing or damaged, so the run's settings "
                           "are unknown; restore it or start a new run in another --out")
        return saved

    def start(self, settings: dict[str, Any], resume: Resume, checkpoint: Path | None) -> None:
        """Write the run's settings and cut metrics.jsonl back to the checkpoint resumed from
        (all of it when a resumed run has none yet)."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.config, yaml.safe_dump(settings))
        if checkpoint is not None:
            M.truncate(self.root, checkpoint_step(checkpoint))
        elif resume:
            self.metrics.unlink(missing_ok=True)
