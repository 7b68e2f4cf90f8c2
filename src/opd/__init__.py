"""opd: on-policy distillation of language models.

The public API (`opd.api`), one function per verb with typed results:

    import opd
    diagnosis = opd.diagnose("student", "teacher", "prompts.jsonl")
    result = opd.train(student="student", teacher="teacher", prompts="prompts.jsonl",
                       out="runs/a", profile="cpu-small", max_steps=50)

The names in `__all__` are what is promised. They load on first use, so `import opd` stays
light; `opd.train`, `opd.evaluate`, `opd.diagnose` and `opd.report` are the API's functions, not
the modules of the same names (import from those with `from opd.train import …`).
"""

from __future__ import annotations

import importlib
import sys
import types
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
    from opd.config import TrainConfig
    from opd.data.prompts import PromptRecord, load_prompts
    from opd.diagnose.measure import DiagnoseConfig
    from opd.diagnose.rules import Thresholds
    from opd.errors import OPDError
    from opd.evaluate import EvalConfig, EvalResult
    from opd.recipes.select_prompts import SelectConfig
    from opd.runtime import StepHook

_PUBLIC = {
    "opd.api": ("train", "grpo", "evaluate", "diagnose", "cold_start", "select_prompts", "report",
                "reproduce", "build_zoo", "TrainResult", "Diagnosis", "TeacherDiagnosis", "Check", "Cost",
                "ColdStartResult", "Selection", "Zoo"),
    "opd.config": ("TrainConfig",),
    "opd.evaluate": ("EvalConfig", "EvalResult"),
    "opd.diagnose.measure": ("DiagnoseConfig",),
    "opd.diagnose.rules": ("Thresholds",),
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


class _Package(types.ModuleType):
    """The `opd` package: a public name resolves, on first use, to the object of the module
    that defines it, also where a submodule has the same name (train, evaluate, diagnose,
    report): the import system's binding of such a submodule to the package is ignored."""

    def __getattr__(self, name: str) -> Any:
        if name in _HOME:
            return getattr(importlib.import_module(_HOME[name]), name)
        raise AttributeError(f"module 'opd' has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOME and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *__all__})


sys.modules[__name__].__class__ = _Package
