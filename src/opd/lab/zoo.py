"""The zoo: a student and teachers with planted properties, built in minutes on a CPU.

`build_zoo_stages(root)` runs a list of named stages — prompt sets, then one stage per model —
and writes `zoo.json`: each model's folder, role, dialect, template, training and its accuracy on
every evaluation set. Each stage is cached under `root/<name>` with a fingerprint of the
profile, the stages it builds on and the code; a stage is built in a temporary folder and
renamed when complete, so an interrupted build never leaves a folder that looks finished.

A stage's fingerprint covers every file of `opd` that it runs: the modules its build calls and
everything they import, found from the source (`code_files`), so a change to the loop, the
objectives or the config rebuilds the RL stage and nothing is served stale.

Planted properties (see `world` for the task):
- `student` (dialect A, template 1) never saw a carry chain: decent on `eval-nochain-*`, poor
  on `eval-chain-*`;
- `teacher-aligned` (dialect A) has the chain sub-skill: new capability, same thinking pattern;
- `teacher-foreign` (dialect B) is as good, but reasons in other words and order;
- `teacher-same-pipeline` saw exactly the student's data, only larger and longer: a higher
  score on the student's own sets and nothing new;
- `teacher-aligned-template2` is teacher-aligned post-trained with prompt template 2, which its
  tokenizer carries;
- `student-rl` is `student-prerl` (a copy of the student) improved by GRPO with the
  exact-match reward (`opd.run.loop`), for reverse distillation.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from opd.data.prompts import PromptRecord, load_prompts, save_prompts
from opd.errors import OPDError
from opd.io import atomic_folder, check_output_folder, write_text_atomic
from opd.lab.tokenizer import build_tokenizer
from opd.lab.world import ADDITION, CHOICE, World, sample_problems, sft_examples
from opd.models.loading import load_model, load_tokenizer
from opd.run.folder import RunFolder
from opd.run.sft import SFTConfig, train_sft
from opd.source import code_files
from opd.version import __version__

ZOO_FILE = "zoo.json"
STAGE_FILE = "stage.json"
DATA = "data"


@dataclass(frozen=True)
class Size:
    """Shape of a from-scratch Llama model."""

    layers: int
    hidden: int
    heads: int = 4


@dataclass(frozen=True)
class ModelStage:
    """One model trained with `train_sft` on prompt sets solved in a dialect."""

    name: str
    role: str
    dialect: str
    template: int
    data: tuple[str, ...]
    steps: int
    seed: int
    size: Size
    lr: float = 3e-3
    init_from: str | None = None
    """Start from this model of the zoo (post-training) instead of a fresh initialisation."""


@dataclass(frozen=True)
class RLStage:
    """GRPO (outcome reward only) of a zoo model with `opd.run.loop`."""

    name: str
    role: str
    init_from: str
    data: str
    steps: int
    seed: int
    lr: float
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    temperature: float = 1.0
    """Rollout temperature of the RL run."""


@dataclass(frozen=True)
class Profile:
    """Sizes of the data sets and the models of one build of the zoo."""

    name: str
    digits: tuple[int, ...]
    train_size: int
    eval_size: int
    post_size: int
    models: tuple[ModelStage | RLStage, ...]
    world: World = ADDITION
    """The dialects and vocabulary the models speak (`ModelStage.dialect` names one)."""


def _profile(
    name: str,
    digits: tuple[int, ...],
    sizes: tuple[int, int, int],
    steps: tuple[int, int, int, int, int, int],
    student: Size,
    big: Size,
    template2_lr: float,
    rl: RLStage,
    world: World = ADDITION,
    aligned: str = "A",
) -> Profile:
    """The zoo's stages; `sizes` = (train, eval, post-training) prompts per set, `steps` =
    student, teacher-aligned, teacher-foreign, teacher-same-pipeline and template-2
    post-training steps; `rl` the RL stage; `aligned` the aligned teachers' dialect of `world`
    (the student speaks A, the foreign teacher B)."""
    s_student, s_aligned, s_foreign, s_same, s_template2 = steps
    student_data, teacher_data = ("student-train",), ("teacher-train",)
    models: tuple[ModelStage | RLStage, ...] = (
        ModelStage("student", "student", "A", 1, student_data, s_student, 11, student),
        ModelStage("teacher-aligned", "teacher", aligned, 1, teacher_data, s_aligned, 12,
                   student),
        ModelStage("teacher-foreign", "teacher", "B", 1, teacher_data, s_foreign, 13, student),
        ModelStage("teacher-same-pipeline", "teacher", "A", 1, student_data, s_same, 14, big),
        ModelStage(
            "teacher-aligned-template2", "teacher", aligned, 2, ("template2-train",), s_template2,
            15, student, lr=template2_lr, init_from="teacher-aligned",
        ),
        ModelStage("student-prerl", "student", "A", 1, (), 0, 11, student, init_from="student"),
        rl,
    )
    return Profile(name, digits, *sizes, models, world)


PROFILES: dict[str, Profile] = {
    "full": _profile(
        "full", (2, 3), (20_000, 200, 4_000), (400, 500, 700, 700, 200),
        Size(3, 128), Size(4, 160), template2_lr=3e-4,
        rl=RLStage("student-rl", "student", "student-prerl", "rl-train", 60, 16, lr=1e-4),
    ),
    # Two-digit problems only (shorter sequences) and fewer steps: the planted properties in
    # a few minutes, for tests (docs/results.md#timings). The same-pipeline teacher is
    # "longer", not larger. The RL stage takes twice the prompts per step at twice the lr
    # (measured over two seeds: sub-skill 0.047 → 0.420 / 0.447 against 0.213 with the full
    # profile's 16 at 1e-4). The template-2 post-training's 40 steps are at an edge: on the
    # 2026-12-02 (third session) machine they left the teacher mid-way (chains 0.13 / 0.49 over
    # two seeds), 80 steps gave 0.993 but turned finding 7's template claim to "does not"
    # (docs/results.md, the zoo): left at 40 until that is settled.
    "quick": _profile(
        "quick", (2,), (3_000, 150, 1_000), (200, 300, 350, 300, 40),
        Size(3, 128), Size(3, 128), template2_lr=1e-3,
        rl=RLStage("student-rl", "student", "student-prerl", "rl-train", 80, 16, lr=2e-4,
                   prompts_per_step=32, temperature=0.7),
    ),
    # The quick profile in the world with genuine choice (`world.CHOICE`): the aligned teacher
    # reasons as the student does but favours other words, so that its top-k overlap with the
    # student starts below 1 at k >= 2 and has room to rise (docs/results.md, issue 25).
    "choice": _profile(
        "choice", (2,), (3_000, 150, 1_000), (200, 300, 350, 300, 40),
        Size(3, 128), Size(3, 128), template2_lr=1e-3,
        rl=RLStage("student-rl", "student", "student-prerl", "rl-train", 80, 16, lr=2e-4,
                   prompts_per_step=32, temperature=0.7),
        world=CHOICE, aligned="A2",
    ),
}


def data_sets(profile: Profile) -> dict[str, list[PromptRecord]]:
    """The prompt sets: held-out evaluation sets per sub-skill and length, then training sets
    drawn without them. `nochain` = the student's distribution (no carry or lone carries);
    `rl-train` holds the harder problems (every one carries) for the RL stage."""
    nochain, every = ("nocarry", "carry"), ("nocarry", "carry", "chain")
    sets: dict[str, list] = {}
    for d in profile.digits:
        sets[f"eval-nochain-d{d}"] = sample_problems(
            profile.eval_size, digits=[d], skills=nochain, seed=1000 + d
        )
        sets[f"eval-chain-d{d}"] = sample_problems(
            profile.eval_size, digits=[d], skills=["chain"], seed=2000 + d
        )
    held_out = {(p.a, p.b) for problems in sets.values() for p in problems}
    draws = {
        "student-train": (profile.train_size, nochain, 1),
        "teacher-train": (profile.train_size, every, 2),
        "template2-train": (profile.post_size, every, 3),
        "rl-train": (profile.post_size, ["carry", "chain"], 4),
    }
    for name, (n, skills, seed) in draws.items():
        sets[name] = sample_problems(
            n, digits=profile.digits, skills=skills, seed=seed, exclude=held_out
        )
    return {name: [p.record() for p in problems] for name, problems in sets.items()}


def build_model(size: Size, tokenizer: Any, seed: int) -> LlamaForCausalLM:
    """A fresh Llama model for the world's vocabulary, initialised from `seed`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=4 * size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def model_folder(root: str | Path, name: str) -> Path:
    """The folder of the zoo model `name` under `root`, once its stage is complete."""
    folder = Path(root) / name
    if not (folder / STAGE_FILE).exists():
        raise OPDError(f"zoo: no complete model {name!r} under {str(root)!r}; build the zoo "
                       "first (opd lab build)")
    return folder


def load_sets(root: str | Path) -> dict[str, list[PromptRecord]]:
    """Every prompt set of a built zoo, by name."""
    return {p.stem: load_prompts(p) for p in sorted((Path(root) / DATA).glob("*.jsonl"))}


SFT_CODE = ("opd.lab.world", "opd.lab.tokenizer", "opd.run.sft", "opd.evaluation.accuracy",
            "opd.models.loading", "opd.data.prompts")
"""What an SFT stage's build runs (besides this module's own code)."""
RL_CODE = (*SFT_CODE, "opd.config.training", "opd.run.loop")
"""What an RL stage's build runs."""


def _code_version(entries: Sequence[str]) -> str:
    """Hash of this module and of all code the stage runs (and the package version)."""
    digest = hashlib.sha256(__version__.encode())
    for path in [Path(__file__), *code_files(entries)]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(root: Path, name: str, fingerprint: str) -> dict[str, Any] | None:
    marker = root / name / STAGE_FILE
    if marker.exists():
        try:
            saved = json.loads(marker.read_text(encoding="utf-8"))
            meta = saved["meta"]
            same = saved.get("fingerprint") == fingerprint
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise OPDError(f"zoo: the cached stage {root / name} is damaged ({STAGE_FILE} is not "
                           "what a build writes); delete that folder and build again") from None
        if same:
            return meta
    return None


def _run_stage(
    root: Path, name: str, fingerprint: str, build: Callable[[Path], dict[str, Any]]
) -> dict[str, Any]:
    """The stage's meta: loaded when its folder is complete with the same fingerprint, else
    built into a temporary folder that is renamed into place once complete."""
    cached = _cached(root, name, fingerprint)
    if cached is not None:
        return cached
    with atomic_folder(root / name) as tmp:
        start = time.perf_counter()
        meta = build(tmp)
        meta["build_seconds"] = round(time.perf_counter() - start, 1)
        (tmp / STAGE_FILE).write_text(json.dumps({"fingerprint": fingerprint, "meta": meta}))
    return meta


def eval_set_accuracy(
    model: Any, tokenizer: Any, sets: dict[str, list[PromptRecord]], world: World = ADDITION
) -> dict[str, float]:
    """Greedy exact-match accuracy on every `eval-*` set, with the model's own template."""
    from opd.evaluation.accuracy import evaluate

    out = {}
    for name, records in sets.items():
        if name.startswith("eval-"):
            digits = max(int(r.meta["digits"]) for r in records)
            result = evaluate(model, tokenizer, records,
                              max_new_tokens=world.max_new_tokens(digits))
            out[name] = round(result.accuracy, 4)
    return out


def _sft_stage(
    spec: ModelStage, root: Path, sets: dict[str, list[PromptRecord]], progress: bool,
    world: World,
) -> Callable[[Path], dict[str, Any]]:
    def build(folder: Path) -> dict[str, Any]:
        tokenizer = build_tokenizer(spec.template, world)
        if spec.init_from:
            model = load_model(str(root / spec.init_from), "zoo model", trainable=True)
        else:
            model = build_model(spec.size, tokenizer, spec.seed)
        examples = [
            ex for name in spec.data
            for ex in sft_examples(sets[name], spec.dialect, spec.seed, world)
        ]
        losses: list[float] = []
        if spec.steps:
            config = SFTConfig(
                steps=spec.steps, lr=spec.lr, seed=spec.seed, progress=progress, desc=spec.name
            )
            losses = train_sft(model, tokenizer, examples, config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return {
            "trained_on": {"sets": list(spec.data), "dialect": spec.dialect, "steps": spec.steps,
                           "lr": spec.lr, "seed": spec.seed, "init_from": spec.init_from,
                           "final_loss": round(losses[-1], 4) if losses else None},
            "parameters": sum(p.numel() for p in model.parameters()),
            "accuracy": eval_set_accuracy(model, tokenizer, sets, world),
        }

    return build


def _rl_stage(
    spec: RLStage, root: Path, sets: dict[str, list[PromptRecord]], progress: bool,
    world: World,
) -> Callable[[Path], dict[str, Any]]:
    def build(folder: Path) -> dict[str, Any]:
        from opd.config.training import build_config
        from opd.run.loop import run_training

        run = folder / "run"
        config = build_config(
            {
                "student": str(root / spec.init_from), "prompts": str(root / DATA / f"{spec.data}.jsonl"),
                "out": str(run), "max_steps": spec.steps, "lr": spec.lr, "seed": spec.seed,
                "distill_weight": 0.0, "outcome_weight": 1.0, "temperature": spec.temperature,
                "prompts_per_step": spec.prompts_per_step,
                "samples_per_prompt": spec.samples_per_prompt,
                "max_new_tokens": world.max_new_tokens(max(int(r.meta["digits"])
                                                           for r in sets[spec.data])),
                "save_every": spec.steps, "keep_checkpoints": 1, "progress": progress,
            },
            profile="cpu-small",
        )
        summary = run_training(config)
        checkpoint = summary["final_checkpoint"]
        model = load_model(checkpoint, "zoo model", trainable=False)
        tokenizer = load_tokenizer(checkpoint, "zoo model")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        shutil.copy(RunFolder(run).metrics, folder / "rl_metrics.jsonl")
        shutil.rmtree(run)
        return {
            "trained_on": {"sets": [spec.data], "method": "grpo", "steps": spec.steps,
                           "lr": spec.lr, "seed": spec.seed, "init_from": spec.init_from,
                           "prompts_per_step": spec.prompts_per_step,
                           "samples_per_prompt": spec.samples_per_prompt},
            "parameters": sum(p.numel() for p in model.parameters()),
            "accuracy": eval_set_accuracy(model, tokenizer, sets, world),
        }

    return build


def _data_stage(profile: Profile) -> Callable[[Path], dict[str, Any]]:
    def build(folder: Path) -> dict[str, Any]:
        sets = data_sets(profile)
        for name, records in sets.items():
            save_prompts(records, folder / f"{name}.jsonl")
        return {"sets": {name: len(records) for name, records in sets.items()}}

    return build


def _with_ancestors(spec: Profile, names: Sequence[str]) -> list[str]:
    """The named stages and every stage they start from, in build order."""
    by_name = {s.name: s for s in spec.models}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise OPDError(f"zoo: unknown model {unknown[0]!r}; choose from {sorted(by_name)}")
    wanted: set[str] = set()
    for name in names:
        while name and name not in wanted:
            wanted.add(name)
            name = by_name[name].init_from
    return [s.name for s in spec.models if s.name in wanted]


def build_zoo_stages(
    root: str | Path, profile: str | Profile = "full", progress: bool = True,
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Build (or load from cache) every stage of the zoo under `root`; returns and writes
    `root/zoo.json`. `profile` names one of `PROFILES` or is a `Profile` of one's own (another
    `World`, other sizes). With `only`, just those models (and those they start from) are
    built and returned, and zoo.json is left as it was."""
    if isinstance(profile, str) and profile not in PROFILES:
        raise OPDError(f"zoo: unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    spec = PROFILES[profile] if isinstance(profile, str) else profile
    profile = spec.name
    root = Path(root)
    check_output_folder(root, "root")
    root.mkdir(parents=True, exist_ok=True)
    sft_code, rl_code = _code_version(SFT_CODE), _code_version(RL_CODE)
    prints = {DATA: _fingerprint(sft_code, asdict(spec) | {"models": None})}
    stages = _with_ancestors(spec, only) if only else [s.name for s in spec.models]
    bar = tqdm([DATA, *stages], desc=f"zoo ({profile})", disable=not progress)
    metas: dict[str, dict[str, Any]] = {}
    sets: dict[str, list[PromptRecord]] = {}
    for name in bar:
        bar.set_postfix_str(name)
        if name == DATA:
            metas[DATA] = _run_stage(root, DATA, prints[DATA], _data_stage(spec))
            sets = load_sets(root)
            continue
        stage = next(s for s in spec.models if s.name == name)
        parents = [DATA, *([stage.init_from] if stage.init_from else [])]
        code = rl_code if isinstance(stage, RLStage) else sft_code
        prints[name] = _fingerprint(code, asdict(stage), [prints[p] for p in parents])
        make = _rl_stage if isinstance(stage, RLStage) else _sft_stage
        metas[name] = _run_stage(root, name, prints[name],
                                 make(stage, root, sets, progress, spec.world))
    zoo = {
        "profile": profile,
        "code_version": {"sft": sft_code, "rl": rl_code},
        "sets": {
            name: {"path": f"{DATA}/{name}.jsonl", "size": size}
            for name, size in metas[DATA]["sets"].items()
        },
        "eval_groups": {
            "student": [f"eval-nochain-d{d}" for d in spec.digits],
            "subskill": [f"eval-chain-d{d}" for d in spec.digits],
        },
        "build_seconds": {name: meta["build_seconds"] for name, meta in metas.items()},
        "models": {},
    }
    for stage in spec.models:
        if stage.name not in metas:
            continue
        meta = metas[stage.name]
        accuracy = meta["accuracy"]
        for group, names in zoo["eval_groups"].items():
            accuracy[group] = round(sum(accuracy[n] for n in names) / len(names), 4)
        # An RL stage keeps the dialect and template of the model it starts from.
        like = zoo["models"][stage.init_from] if isinstance(stage, RLStage) else asdict(stage)
        zoo["models"][stage.name] = {
            "folder": stage.name,
            "role": stage.role,
            "dialect": like["dialect"],
            "template": like["template"],
            **{k: v for k, v in meta.items() if k != "build_seconds"},
        }
    if only is None:
        write_text_atomic(root / ZOO_FILE, json.dumps(zoo, indent=2))
    return zoo
