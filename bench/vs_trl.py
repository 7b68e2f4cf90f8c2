"""Seconds per on-policy distillation step: opd beside TRL's DistillationTrainer, same models.

Both get the same student and teacher (random Llamas sharing one word-level vocabulary), the
same prompts, 64 prompts with one rollout each per step and the same response cap; TRL's
trainer (fully on-policy) runs with β = 1, reverse KL over the whole vocabulary, and its
gradient checkpointing off (its faster setting at these sizes). opd runs the same
objective (`full_reverse_kl`) and its default (`topk`), both with every measure computed each
step. Each run is a fresh process; runs alternate (opd, TRL, opd, TRL, …) so drift on a shared
machine falls on both, and the ratio is the median over pairs of the median step time after
the warm-up steps (the last column: the lowest and highest ratio of a pair). Peak memory is
the process's maximum resident set (CPU) or the peak of allocated GPU memory.

    pip install -e ".[trl]"
    python bench/vs_trl.py                       # the CPU tiny pair, 5 alternating pairs
    python bench/vs_trl.py --rows tiny small     # also a 32k vocabulary (long: docs/results.md#timings)
    python bench/vs_trl.py --rows tiny large     # also ~0.4B/1.4B shapes (a GPU, or patience)
    python bench/vs_trl.py --rows smollm2 --pairs 1 --steps 3 --warmup 1   # a real model

The tiny pair (300 words) measures the per-step overheads: its matrices are so small that
Python and per-operation costs dominate. The small pair (hidden 256/512, 4 layers, 32,000
words) is the first where the output head and the divergence over the vocabulary weigh what
they weigh in real runs.

Single runs on a 2-core machine are noisy: read the median and the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROWS = {
    # name: (student shape, teacher shape, vocabulary, new tokens)
    "tiny": ({"hidden": 64, "layers": 2, "heads": 4}, {"hidden": 96, "layers": 2, "heads": 4},
             300, 48),
    # a real vocabulary on small backbones: the output head and the KL over 32k words weigh as
    # they do in real runs, and a CPU still runs it in minutes
    "small": ({"hidden": 256, "layers": 4, "heads": 4}, {"hidden": 512, "layers": 4, "heads": 8},
              32_000, 64),
    "large": ({"hidden": 1024, "layers": 24, "heads": 16}, {"hidden": 2048, "layers": 24,
                                                             "heads": 16}, 32_000, 256),
    # a real pretrained model as student and teacher: SmolLM2-135M-Instruct (`make test-real`
    # installs it), chat prompts through its template
    "smollm2": (None, None, 49_152, 32),
}
PROMPTS_PER_STEP, ROLLOUTS = 64, 1


def make_real_pair(root: Path) -> None:
    """SmolLM2-135M-Instruct as student and teacher, and two-digit additions as chat prompts."""
    from opd.models.gguf import converted_folder
    from real_models import smollm2_gguf  # bench/real_models.py, beside this script

    folder = Path(converted_folder(str(smollm2_gguf()), "student"))
    for name in ("student", "teacher"):
        (root / name).symlink_to(folder)
    examples = Path(__file__).parents[1] / "examples" / "additions.jsonl"
    rows = [json.loads(line) for line in examples.read_text().splitlines()]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["messages"]}) + "\n"
                                                for r in rows))


def make_pair(root: Path, row: str) -> None:
    """Student and teacher folders (random Llamas, one word-level tokenizer) and prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if row == "smollm2":
        make_real_pair(root)
        return
    student_shape, teacher_shape, vocab, _ = ROWS[row]
    words = [f"w{i}" for i in range(vocab - 4)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(
        ["<pad>", "<bos>", "<eos>", "<unk>", *words])}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>",
                                        eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    for seed, (name, shape) in enumerate((("student", student_shape), ("teacher", teacher_shape))):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=shape["hidden"], intermediate_size=4 * shape["hidden"],
            num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
            num_key_value_heads=shape["heads"], max_position_embeddings=1024,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = LlamaForCausalLM(config)
        model.generation_config.pad_token_id = 0
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    lines = [json.dumps({"prompt": " ".join(f"w{(i * 7 + j) % 200}" for j in range(8))})
             for i in range(256)]
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_opd(root: Path, row: str, steps: int, objective: str) -> dict:
    from opd import metrics as M
    from opd.config.training import build_config
    from opd.run.loop import Trainer
    from opd.runtime import StepHook

    class Clock(StepHook):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step(self, record) -> bool:
            self.times.append(time.perf_counter())
            return False

    out = root / f"opd-{objective}-{time.time_ns()}"
    config = build_config({
        "student": str(root / "student"), "teacher": str(root / "teacher"),
        "prompts": str(root / "prompts.jsonl"), "out": str(out), "max_steps": steps,
        "prompts_per_step": PROMPTS_PER_STEP, "samples_per_prompt": ROLLOUTS,
        "max_new_tokens": ROWS[row][3], "lr": 1e-6, "save_every": 10**6, "progress": False,
        "objective": {"name": objective}, "top_p": 1.0, "temperature": 1.0,
    })
    clock = Clock()
    trainer = Trainer(config, hooks=[clock])
    start = time.perf_counter()
    trainer.run()
    times = [b - a for a, b in zip([start, *clock.times], clock.times, strict=False)]
    lengths = [r[M.RESPONSE_LENGTH] for r in M.read(out)]
    return {"step_seconds": times, "response_length": lengths, "peak_gib": peak_memory_gib()}


def run_trl(root: Path, row: str, steps: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.lengths: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    prompts = [json.loads(line) for line in (root / "prompts.jsonl").read_text().splitlines()]
    args = DistillationConfig(
        output_dir=str(root / f"trl-{time.time_ns()}"), max_steps=steps, learning_rate=1e-6,
        per_device_train_batch_size=PROMPTS_PER_STEP * ROLLOUTS, beta=1.0,
        max_completion_length=ROWS[row][3], temperature=1.0,
        top_p=1.0, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
        gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(), seed=0,
        bf16=torch.cuda.is_available(),
    )
    student = AutoModelForCausalLM.from_pretrained(root / "student")
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher")
    clock = Clock()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=Dataset.from_list(prompts),
                                  processing_class=AutoTokenizer.from_pretrained(root / "student"),
                                  callbacks=[clock])
    start = time.perf_counter()
    trainer.train()
    times = [b - a for a, b in zip([start, *clock.times], clock.times, strict=False)]
    return {"step_seconds": times, "response_length": clock.lengths, "peak_gib": peak_memory_gib()}


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    if args.worker == "trl":
        result = run_trl(root, args.row, args.steps)
    else:
        result = run_opd(root, args.row, args.steps, args.worker.removeprefix("opd-"))
    print("RESULT " + json.dumps(result))


def launch(kind: str, root: Path, row: str, steps: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--root", str(root), "--row", row,
               "--steps", str(steps), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{kind} run failed:\n{done.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def summarise(runs: list[dict], warmup: int) -> dict:
    medians = [statistics.median(r["step_seconds"][warmup:]) for r in runs]
    lengths = [statistics.mean(r["response_length"][warmup:] or r["response_length"]) for r in runs]
    tokens = [PROMPTS_PER_STEP * ROLLOUTS * n / s for n, s in zip(lengths, medians, strict=True)]
    return {"step_s": statistics.median(medians), "spread": (min(medians), max(medians)),
            "tokens_per_s": statistics.median(tokens), "length": statistics.mean(lengths),
            "peak_gib": max(r["peak_gib"] for r in runs), "medians": medians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=["tiny"], choices=list(ROWS))
    parser.add_argument("--pairs", type=int, default=5, help="alternating opd/TRL pairs")
    parser.add_argument("--steps", type=int, default=8, help="steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--row", default="tiny", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"cpu, {args.threads} threads"
    print(f"{PROMPTS_PER_STEP} prompts × {ROLLOUTS} rollouts per step, {args.steps} steps per run "
          f"({args.warmup} warm-up left out), {args.pairs} alternating pairs, {device}\n")
    print(f"{'row':<6} {'run':<26} {'s/step':>7} {'spread':>13} {'tokens/s':>9} {'mean len':>8} "
          f"{'peak GiB':>8} {'opd/TRL':>8} {'pairs':>11}")
    for row in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_pair(root, row)
            kinds = ["opd-full_reverse_kl", "trl", "opd-topk"]
            runs: dict[str, list[dict]] = {k: [] for k in kinds}
            for _ in range(args.pairs):
                for kind in kinds:
                    runs[kind].append(launch(kind, root, row, args.steps, args.threads))
            table = {k: summarise(v, args.warmup) for k, v in runs.items()}
            trl = table["trl"]
            for kind, label in (("trl", "TRL DistillationTrainer β=1"),
                                ("opd-full_reverse_kl", "opd full_reverse_kl"),
                                ("opd-topk", "opd topk (default)")):
                t = table[kind]
                ratios = [a / b for a, b in zip(t["medians"], trl["medians"], strict=True)]
                ratio = "" if kind == "trl" else f"{statistics.median(ratios):.2f}"
                pairs = "" if kind == "trl" else f"{min(ratios):.2f}–{max(ratios):.2f}"
                print(f"{row:<6} {label:<26} {t['step_s']:>7.3f} "
                      f"{t['spread'][0]:>6.3f}–{t['spread'][1]:<6.3f} {t['tokens_per_s']:>9.0f} "
                      f"{t['length']:>8.1f} {t['peak_gib']:>8.2f} {ratio:>8} {pairs:>11}")


if __name__ == "__main__":
    main()
