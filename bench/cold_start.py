"""Does OPD after the off-policy cold start add to what the fine-tuning reached? On the quick
zoo's foreign pair and on a second world of other tokens and dialects (docs/method.md#recipes).

For each world, the student and the foreign-dialect teacher are built (cached under --zoo),
then `opd cold-start` runs with the `cpu-small` profile and any --set overrides (forced past
the gate, so that OPD is measured either way; the gate's verdict is recorded). Greedy accuracy
on the withheld sub-skill (carry chains, 150 prompts): the student before, after SFT (OPD's
step 0) and after OPD, and the teacher. Prints one JSON line per run and writes results.json.

    python bench/cold_start.py --zoo .opd-cache/bench-zoo --out runs/cold-bench --worlds zoo other
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from opd import metrics as M
from opd.config.settings import parse_set
from opd.config.training import build_config
from opd.data.prompts import load_prompts
from opd.evaluation.accuracy import evaluate
from opd.lab.world import Dialect, World, vocabulary
from opd.lab.zoo import PROFILES, ModelStage, Profile, Size, build_zoo_stages
from opd.models.loading import load_model, load_tokenizer
from opd.recipes.cold_start import run_cold_start

OTHER = World(
    "other",
    dialects := (
        Dialect("P", ("s", "top", "bottom", "carry_in", "to", "total", ("set", "mark", "pin"),
                      "digit", ("up", "lift", "raise"), "carry_out", "!"),
                filler=("so", "um", "yes"), filler_at=0),
        Dialect("Q", ("take", "carry_in", "plus", "bottom", "plus", "top", "makes", "total",
                      ("low", "unit", "base"), "digit", ("high", "rest", "tens"), "carry_out",
                      "#"), filler=("er", "like", "see"), filler_at=13),
    ),
    vocabulary(dialects),
)
"""A second world: the same additions said with other words in another order (P writes the
column top-first and the carry last, Q starts from the carry)."""


def world_profile(name: str) -> tuple[Profile, str, str]:
    """The profile to build, and its student and foreign-teacher model names."""
    if name == "zoo":
        return PROFILES["quick"], "student", "teacher-foreign"
    quick = PROFILES["quick"]
    size = Size(3, 128)
    models = (ModelStage("student", "student", "P", 1, ("student-train",), 200, 21, size),
              ModelStage("teacher", "teacher", "Q", 1, ("teacher-train",), 350, 22, size))
    profile = Profile("other", quick.digits, quick.train_size, quick.eval_size,
                      quick.post_size, models, world=OTHER)
    return profile, "student", "teacher"


def accuracy(path: str | Path, records: list, tokens: int) -> float:
    model = load_model(str(path), "model", trainable=False)
    return evaluate(model, load_tokenizer(str(path), "model"), records,
                    max_new_tokens=tokens).accuracy


def run(world: str, zoo_root: Path, out: Path, seed: int, prompts: int,
        overrides: dict[str, Any]) -> dict[str, Any]:
    profile, student, teacher = world_profile(world)
    root = zoo_root / world
    build_zoo_stages(root, profile, progress=False, only=[student, teacher])
    digits = max(profile.digits)
    tokens = profile.world.max_new_tokens(digits)
    chain_file = root / "data" / f"eval-chain-d{digits}.jsonl"
    cold_prompts = out / f"{world}-prompts-{prompts}.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    rows = (root / "data" / "teacher-train.jsonl").read_text().splitlines()[:prompts]
    cold_prompts.write_text("\n".join(rows) + "\n")
    folder = out / f"{world}-seed{seed}"
    config = build_config({
        "student": str(root / student), "teacher": str(root / teacher),
        "prompts": str(root / "data" / "teacher-train.jsonl"), "out": str(folder),
        "max_new_tokens": tokens, "seed": seed, "progress": False,
        "eval_prompts": str(chain_file), "cold_start": {"prompts": str(cold_prompts)},
    }, overrides, profile="cpu-small")
    report = run_cold_start(config, resume=folder.exists(), force=True)
    records = M.read(folder / "opd")
    chain = load_prompts(chain_file)
    return {
        "world": world, "seed": seed, "prompts": prompts, "overrides": overrides,
        "teacher_data": report["teacher_data"],
        "sft": {k: report["sft"][k] for k in ("cap", "steps", "best_step", "stopped_early",
                                               "best_validation_loss", "seconds")},
        "warnings": report["warnings"],
        "gate": {"passed": report["gate"]["passed"],
                 "overlap_share": report["gate"]["pattern"]["value"],
                 "accuracy": report["gate"]["accuracy"]},
        "chain": {"student": accuracy(root / student, chain, tokens),
                  "after_sft": report["opd"]["initial_accuracy"],
                  "after_opd": report["opd"]["final_accuracy"],
                  "teacher": accuracy(root / teacher, chain, tokens)},
        "opd": {"steps": report["opd"]["steps"],
                "overlap_first": records[0][M.OVERLAP_RATIO],
                "overlap_last": records[-1][M.OVERLAP_RATIO],
                "alerts": [a["rule"] for a in report["opd"]["alerts"]]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default=".opd-cache/bench-zoo")
    parser.add_argument("--out", default="runs/cold-bench")
    parser.add_argument("--worlds", nargs="+", default=["zoo", "other"], choices=["zoo", "other"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--prompts", type=int, default=400, help="cold-start prompts (of "
                        "teacher-train)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="settings over the cpu-small profile, e.g. max_steps=100")
    args = parser.parse_args()
    overrides = parse_set(args.set)
    results = []
    for world in args.worlds:
        for seed in args.seeds:
            results.append(run(world, Path(args.zoo), Path(args.out), seed, args.prompts, overrides))
            print(json.dumps(results[-1]), flush=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
