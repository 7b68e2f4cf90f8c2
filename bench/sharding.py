"""Per-process memory of the student's parameters, gradients and AdamW state, and the time of a
step, for `opd train` in one process and under a distributed launch (`parallel: fsdp` / `ddp`).

Builds a random Llama student and a small teacher (no download), runs a few steps per row
(the launched rows through `torch.distributed.run`, as `accelerate launch --multi_gpu` does),
and prints, per row, the largest per-process byte count of each kind and the median step time.
The goal for the student under FSDP with 2 processes: ≤ 0.55× the one-process bytes.

    python bench/sharding.py                              # CPU: 1 process, FSDP and DDP on 2
    python bench/sharding.py --large --rows one fsdp-bf16-1   # one GPU: FSDP2 + bf16 on 1 process
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from opd_step import make_model, make_tokenizer  # the bench's shared model maker

SHAPES = {  # name: (hidden, layers, heads, intermediate), vocabulary
    "small": ({"student": (256, 4, 4, 1024), "teacher": (64, 2, 4, 128)}, 8_000),
    "large": ({"student": (1024, 16, 16, 4096), "teacher": (1024, 4, 16, 4096)}, 151_936),
}
ROWS = {  # name: (processes, 0 = no launch; settings)
    "one": (0, {}),
    "fsdp-2": (2, {"parallel": "fsdp"}),
    "ddp-2": (2, {"parallel": "ddp"}),
    "fsdp-bf16-1": (1, {"parallel": "fsdp", "mixed_precision": "bf16", "dtype": "float32"}),
    "fsdp-bf16-2": (2, {"parallel": "fsdp", "mixed_precision": "bf16", "dtype": "float32"}),
}


def local_bytes(tensors) -> int:
    """Bytes this process holds of `tensors` (its shard of a sharded one)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def worker(spec_file: str) -> None:
    """One row, in each process: train, measuring the bytes at the optimizer step."""
    from opd.config.training import build_config
    from opd.run.loop import Trainer
    from opd.runtime import StepHook

    spec = json.loads(Path(spec_file).read_text())
    trainer = Trainer(build_config(spec["settings"]))
    student, optimizer = trainer.models.student, trainer.optimizer
    seen: dict[str, int] = {}

    def count_gradients(*_) -> None:
        seen["gradients"] = local_bytes(p.grad for p in student.parameters() if p.grad is not None)

    optimizer.register_step_pre_hook(count_gradients)
    ends: list[float] = []

    class Clock(StepHook):
        def on_step(self, record) -> bool:
            ends.append(time.perf_counter())
            return False

    trainer.hooks.append(Clock())
    start = time.perf_counter()
    trainer.run()
    seen["parameters"] = local_bytes(student.parameters())
    seen["optimizer"] = local_bytes(v for state in optimizer.state.values()
                                    for v in state.values() if torch.is_tensor(v))
    steps = [b - a for a, b in zip([start, *ends], ends, strict=False)][1:]  # without the first
    seen["step_s"] = statistics.median(steps)
    Path(spec["result"]).with_suffix(f".{trainer.procs.rank}.json").write_text(json.dumps(seen))


def run_row(name: str, root: Path, settings: dict) -> dict:
    processes, extra = ROWS[name]
    spec = root / f"{name}.json"
    spec.write_text(json.dumps({"settings": {**settings, **extra, "out": str(root / name)},
                                "result": str(root / f"result-{name}.json")}))
    command = [sys.executable, __file__, "--worker", str(spec)]
    if processes:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(processes)]
    subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    shares = [json.loads(f.read_text()) for f in sorted(root.glob(f"result-{name}.*.json"))]
    return {key: max(s[key] for s in shares) for key in shares[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=["one", "fsdp-2", "ddp-2"], choices=ROWS)
    parser.add_argument("--large", action="store_true", help="~0.5B student (for GPUs)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    shapes, vocab = SHAPES["large" if args.large else "small"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = make_tokenizer(vocab)
        sizes = {name: make_model(root / name, shape, vocab, tokenizer, seed)
                 for seed, (name, shape) in enumerate(shapes.items())}
        prompts = root / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n"
                                   for i in range(32)))
        settings = {"student": str(root / "student"), "teacher": str(root / "teacher"),
                    "prompts": str(prompts), "max_steps": args.steps, "prompts_per_step": 4,
                    "samples_per_prompt": 2, "max_new_tokens": 16, "lr": 1e-5,
                    "save_every": 10_000, "progress": False, "dtype": "float32"}
        results = {name: run_row(name, root, settings) for name in args.rows}
    base = results[args.rows[0]]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"student {sizes['student'] / 1e6:.1f}M parameters, vocabulary {vocab}, {device}; "
          f"largest share of any process, ratio to the row {args.rows[0]!r}")
    print(f"{'row':<12} {'params MiB':>10} {'grads MiB':>9} {'AdamW MiB':>9} {'total MiB':>9} "
          f"{'× total':>7} {'step s':>7} {'× step':>6}")
    for name, r in results.items():
        total = r["parameters"] + r["gradients"] + r["optimizer"]
        base_total = base["parameters"] + base["gradients"] + base["optimizer"]
        print(f"{name:<12} {r['parameters'] / 2**20:>10.1f} {r['gradients'] / 2**20:>9.1f} "
              f"{r['optimizer'] / 2**20:>9.1f} {total / 2**20:>9.1f} {total / base_total:>7.2f} "
              f"{r['step_s']:>7.2f} {r['step_s'] / base['step_s']:>6.2f}")


if __name__ == "__main__":
    main()
