"""Gap recovery of OPD on the model organisms: a compatible teacher, a foreign one, and the
foreign one after an off-policy cold start (docs/method.md#recipes), over several seeds.

gap recovery = (acc_after − acc_before) / (acc_teacher − acc_before) on the withheld
sub-skill's evaluation set (greedy exact match). Prints a table and writes results.json.

    python bench/repairs.py --zoo .opd-cache/zoo/quick --out runs/repairs --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from opd import metrics as M
from opd.config.training import build_config
from opd.data.prompts import load_prompts
from opd.evaluation.accuracy import evaluate
from opd.lab.world import max_new_tokens
from opd.lab.zoo import PROFILES, build_zoo_stages
from opd.models.loading import load_model, load_tokenizer
from opd.recipes.cold_start import run_cold_start
from opd.run.folder import RunFolder
from opd.run.loop import run_training


def accuracy(path: str, eval_file: Path, tokens: int) -> float:
    model = load_model(path, "model", trainable=False)
    return evaluate(model, load_tokenizer(path, "model"), load_prompts(eval_file),
                    max_new_tokens=tokens).accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default=".opd-cache/zoo/quick")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--out", default="runs/repairs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    zoo_root, out = Path(args.zoo), Path(args.out)
    build_zoo_stages(zoo_root, args.profile, progress=False,
              only=["student", "teacher-aligned", "teacher-foreign"])
    digits = max(PROFILES[args.profile].digits)
    tokens = max_new_tokens(digits)
    eval_file = zoo_root / "data" / f"eval-chain-d{digits}.jsonl"
    student = str(zoo_root / "student")
    before = accuracy(student, eval_file, tokens)
    rows = []
    for seed in args.seeds:
        for name, teacher, cold in (("aligned", "teacher-aligned", False),
                                    ("foreign", "teacher-foreign", False),
                                    ("foreign + cold start", "teacher-foreign", True)):
            run = out / f"{name.replace(' + ', '-').replace(' ', '-')}-seed{seed}"
            config = build_config({
                "student": student, "teacher": str(zoo_root / teacher),
                "prompts": str(zoo_root / "data" / "teacher-train.jsonl"), "out": str(run),
                "max_steps": args.steps, "max_new_tokens": tokens, "seed": seed,
                "progress": False, "eval_every": 10_000,
                "cold_start": {"sft_steps": 400, "sft_lr": 1e-3, "sft_batch_size": 64},
            }, profile="cpu-small")
            resume = run.exists()
            if cold:
                report = run_cold_start(config, resume=resume, force=True)  # measured either way
                trained = report["opd"]["final_checkpoint"]
                records = M.read(run / "opd")
                after_sft = accuracy(str(run / "sft"), eval_file, tokens)
            else:
                run_training(config, resume=resume)
                trained = str(RunFolder(run).complete_checkpoints()[-1])
                records = M.read(run)
                after_sft = None
            teacher_acc = accuracy(str(zoo_root / teacher), eval_file, tokens)
            after = accuracy(trained, eval_file, tokens)
            rows.append({
                "run": name, "seed": seed, "before": before, "after_sft": after_sft,
                "after": after, "teacher": teacher_acc,
                "gap_recovery": (after - before) / (teacher_acc - before),
                "overlap_first": records[0]["overlap_ratio"],
                "overlap_last": records[-1]["overlap_ratio"],
                "truncation_last": records[-1]["truncation_rate"],
            })
            print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print_recovery(rows, before, "overlap", width=22)


def print_recovery(rows: list[dict], before: float, trend: str, width: int) -> None:
    """One line per run (mean over its seeds): accuracy before and after, the teacher's, the
    share of the gap recovered, and the `trend` measure's first → last step."""
    header = f"{trend} first→last"
    print(f"\n{'run':<{width}} {'seeds':>5} {'before':>7} {'after':>13} {'teacher':>7} "
          f"{'gap recovery':>16} {header:>{len(header) + 1}}")
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == name]
        recov = [r["gap_recovery"] for r in mine]
        after = [r["after"] for r in mine]
        spread = statistics.pstdev(recov) if len(recov) > 1 else 0.0
        print(f"{name:<{width}} {len(mine):>5} {before:>7.3f} "
              f"{statistics.mean(after):>7.3f}±{statistics.pstdev(after):.3f} "
              f"{mine[0]['teacher']:>7.3f} {statistics.mean(recov):>9.1%} ± {spread:.1%} "
              f"{statistics.mean(r[f'{trend}_first'] for r in mine):>8.3f} → "
              f"{statistics.mean(r[f'{trend}_last'] for r in mine):.3f}")


if __name__ == "__main__":
    main()
