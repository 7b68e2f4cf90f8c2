"""Rollouts ahead of the update on the model organisms: throughput, the staleness meter and
accuracy against `max_staleness` S, for `topk` (reverse KL) and `forward_kl`, on the CPU.

OPD from the quick zoo's teacher-aligned into its student (`cpu-small` profile: 16 prompts ×
4 rollouts, top-8, lr 1e-4 with warm-up and cosine decay) for each objective and S, the meter
every `--meter-every` steps; greedy accuracy on the carry-chain set after. S = 0 runs once with
one torch thread (the trainer alone) and, unless --one-thread-only, once with two (the cores
async uses: its worker thread and the trainer, one each). Step time = the step's sampling
wait + scoring + update, median over the steps where neither it nor the step before was
measured by the meter (whose extra sampling and backward run outside those timers and give the
worker a head start). Prints a table and writes results-seed<seed>.json.

    OMP_NUM_THREADS=1 python bench/async_rollouts.py --zoo /tmp/opd-zoo/quick --out runs/async
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from opd import metrics as M
from opd.config.training import build_config
from opd.data.prompts import load_prompts
from opd.evaluation.accuracy import evaluate
from opd.lab.world import max_new_tokens
from opd.lab.zoo import PROFILES, build_zoo_stages
from opd.models.loading import load_model, load_tokenizer
from opd.run.folder import RunFolder
from opd.run.loop import run_training

STEP_TIMES = (M.TIME_ROLLOUT, M.TIME_SCORE, M.TIME_UPDATE)


def accuracy(path: str, eval_file: Path, tokens: int) -> float:
    model = load_model(path, "model", trainable=False)
    return evaluate(model, load_tokenizer(path, "model"), load_prompts(eval_file),
                    max_new_tokens=tokens).accuracy


def step_time(records: list[dict], meter_every: int) -> float:
    """Median seconds of the steps the meter did not touch (nor the step before)."""
    untouched = [r for r in records
                 if not meter_every or (r[M.STEP] % meter_every not in (0, 1) and r[M.STEP] > 1)]
    return statistics.median(sum(r[k] for k in STEP_TIMES) for r in untouched)


def mean_of(records: list[dict], key: str, staleness: int) -> float | None:
    """Mean of the meter's `key` over the steps at the run's full staleness."""
    values = [r[key] for r in records if r.get(key) is not None and r[M.STALENESS] == staleness]
    return statistics.mean(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default=".opd-cache/zoo/quick")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--out", default="runs/async")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--objectives", nargs="+", default=["topk", "forward_kl"])
    parser.add_argument("--meter-every", type=int, default=5)
    parser.add_argument("--tis-cap", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one-thread-only", action="store_true",
                        help="skip the synchronous runs with two torch threads")
    args = parser.parse_args()
    zoo_root, out = Path(args.zoo), Path(args.out)
    build_zoo_stages(zoo_root, args.profile, progress=False, only=["student", "teacher-aligned"])
    tokens = max_new_tokens(max(PROFILES[args.profile].digits))
    eval_file = zoo_root / "data" / f"eval-chain-d{max(PROFILES[args.profile].digits)}.jsonl"
    before = accuracy(str(zoo_root / "student"), eval_file, tokens)
    plan = [(o, s, 1) for o in args.objectives for s in args.staleness]
    if not args.one_thread_only:
        plan += [(o, 0, 2) for o in args.objectives if 0 in args.staleness]
    rows = []
    for objective, staleness, threads in plan:
        run = out / f"{objective}-S{staleness}-t{threads}-seed{args.seed}"
        config = build_config({
            "student": str(zoo_root / "student"), "teacher": str(zoo_root / "teacher-aligned"),
            "prompts": str(zoo_root / "data" / "teacher-train.jsonl"), "out": str(run),
            "max_steps": args.steps, "max_new_tokens": tokens, "progress": False,
            "seed": args.seed,
            "eval_every": 10_000, "save_every": args.steps, "objective": {"name": objective},
            "max_staleness": staleness, "staleness_meter_every": args.meter_every,
            "tis_cap": args.tis_cap if staleness and objective == "forward_kl" else 0.0,
        }, profile="cpu-small")
        torch.set_num_threads(threads)
        start = time.perf_counter()
        run_training(config)
        wall = time.perf_counter() - start
        torch.set_num_threads(1)
        records = M.read(run)
        rows.append({
            "objective": objective, "max_staleness": staleness, "threads": threads,
            "seed": args.seed,
            "step_s": step_time(records, args.meter_every), "wall_s": wall,
            "loss_bias": mean_of(records, M.STALENESS_LOSS_BIAS, staleness),
            "grad_cosine": mean_of(records, M.STALENESS_GRAD_COSINE, staleness),
            "grad_norm_ratio": mean_of(records, M.STALENESS_GRAD_NORM_RATIO, staleness),
            "accuracy": accuracy(str(RunFolder(run).complete_checkpoints()[-1]), eval_file,
                                 tokens),
        })
        print(json.dumps(rows[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results-seed{args.seed}.json").write_text(json.dumps({"before": before, "rows": rows}, indent=2))
    print(f"\nchain-set accuracy before OPD: {before:.3f}; {args.steps} steps each, seed "
          f"{args.seed}\n")
    print("| objective | S | torch threads | s / step | × S=0, 1 thread | × S=0, 2 threads "
          "| meter: loss bias | grad cosine | grad norm ratio | accuracy after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for row in rows:
        base = {r["threads"]: r["step_s"] for r in rows
                if r["objective"] == row["objective"] and r["max_staleness"] == 0}
        print(f"| {row['objective']} | {row['max_staleness']} | {row['threads']} | "
              f"{row['step_s']:.3f} | {base[1] / row['step_s']:.2f} | "
              f"{fmt(base[2] / row['step_s'] if 2 in base else None, '.2f')} | "
              f"{fmt(row['loss_bias'], '+.4f')} | {fmt(row['grad_cosine'], '.3f')} | "
              f"{fmt(row['grad_norm_ratio'], '.3f')} | {row['accuracy']:.3f} |")


if __name__ == "__main__":
    main()
