"""opd: on-policy distillation of language models.

The public API (`opd.api`), one function per verb with typed results:

    import opd
    diagnosis = opd.diagnose("student", "teacher", "prompts.jsonl")
    result = opd.train(student="student", teacher="teacher", prompts="prompts.jsonl",
                       out="runs/a", profile="cpu-small", max_steps=50)

The names in `__all__` are what is promised. They load on first use, so `import opd` stays
light. No module of the package is named after a public name: `opd.train` is always the
function.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from opd.version import __version__

if TYPE_CHECKING:
    from opd.api import (
        Check,
        ColdStartResult,
        Cost,
        Diagnosis,
        Selection,
        TeacherDiagnosis,
        TrainResult,
        Zoo,
        build_zoo,
        cold_start,
        diagnose,
        evaluate,
        grpo,
        report,
        reproduce,
        select_prompts,
        train,
    )
    from opd.config.training import TrainConfig
    from opd.data.prompts import PromptRecord, load_prompts
    from opd.doctor.measure import DiagnoseConfig
    from opd.doctor.rules import Thresholds
    from opd.errors import OPDError
    from opd.evaluation.accuracy import EvalConfig, EvalResult
    from opd.recipes.select_prompts import SelectConfig
    from opd.runtime import StepHook

_PUBLIC = {
    "opd.api": ("train", "grpo", "evaluate", "diagnose", "cold_start", "select_prompts", "report",
                "reproduce", "build_zoo", "TrainResult", "Diagnosis", "TeacherDiagnosis", "Check", "Cost",
                "ColdStartResult", "Selection", "Zoo"),
    "opd.config.training": ("TrainConfig",),
    "opd.evaluation.accuracy": ("EvalConfig", "EvalResult"),
    "opd.doctor.measure": ("DiagnoseConfig",),
    "opd.doctor.rules": ("Thresholds",),
    "opd.recipes.select_prompts": ("SelectConfig",),
    "opd.data.prompts": ("load_prompts", "PromptRecord"),
    "opd.runtime": ("StepHook",),
    "opd.errors": ("OPDError",),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = [
    "Check",
    "ColdStartResult",
    "Cost",
    "DiagnoseConfig",
    "Diagnosis",
    "EvalConfig",
    "EvalResult",
    "OPDError",
    "PromptRecord",
    "SelectConfig",
    "Selection",
    "StepHook",
    "TeacherDiagnosis",
    "Thresholds",
    "TrainConfig",
    "TrainResult",
    "Zoo",
    "__version__",
    "build_zoo",
    "cold_start",
    "diagnose",
    "evaluate",
    "grpo",
    "load_prompts",
    "report",
    "reproduce",
    "select_prompts",
    "train",
]
assert set(__all__) == {"__version__", *_HOME}


def __getattr__(name: str) -> Any:
    """Load a public name from the module that defines it, on first use."""
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'opd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
