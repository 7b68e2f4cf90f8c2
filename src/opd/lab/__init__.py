"""Model organisms: a small world of addition problems, a shared tokenizer and a zoo of tiny
models (a student and teachers with planted properties) to study OPD on a CPU in minutes."""

from opd.lab.tokenizer import build_tokenizer
from opd.lab.world import (
    ADDITION,
    DIALECTS,
    SKILLS,
    Dialect,
    Problem,
    World,
    sample_problems,
    sft_examples,
    solve,
    vocabulary,
)
from opd.lab.zoo import PROFILES, build_zoo_stages, load_sets, model_folder

__all__ = [
    "ADDITION",
    "DIALECTS",
    "PROFILES",
    "SKILLS",
    "Dialect",
    "Problem",
    "World",
    "build_tokenizer",
    "build_zoo_stages",
    "load_sets",
    "model_folder",
    "sample_problems",
    "sft_examples",
    "solve",
    "vocabulary",
]
