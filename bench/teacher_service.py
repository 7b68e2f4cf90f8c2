"""Step time with a served teacher against the in-process teacher, and the server's scoring
throughput (needs the `serve` extra).

Builds a random student and a larger random teacher (word-level vocabulary, float32) as HF
folders, starts `opd serve-teacher` as its own process on 127.0.0.1, and runs the same
fixed-seed `opd train` steps with `--teacher FOLDER` and `--teacher http://…`, alternating the
two `--repeats` times, and reports the median step time of each (warm-up steps left out) and
their ratio: on a machine shared with other jobs the median of alternated runs is what holds
still. Then it measures the tokens per second
`POST /v1/score` scores (k = 16 with 16 candidate ids per position) beside the same backend
called in process, so the HTTP and JSON cost is visible.

With `--vllm` (in the .venv-vllm environment of `make test-vllm`) it measures instead the
server's scored tokens/s with each backend, hf and vllm, on a teacher whose attention heads
vLLM's CPU build runs (size 64), k = 16 without candidates (which the vllm backend does not
take).

    python bench/teacher_service.py --out /tmp/opd-serve-bench
    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python bench/teacher_service.py --out /tmp/b --vllm
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from opd_step import make_model, make_tokenizer  # noqa: E402

SHAPES = {"student": (64, 2, 4, 128), "teacher": (128, 2, 4, 256)}
VLLM_TEACHER = (128, 2, 2, 256)
"""The teacher's shape with heads of 64, which vLLM's CPU attention takes."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build(out: Path, vocab: int) -> dict[str, Path]:
    tokenizer = make_tokenizer(vocab)
    folders = {}
    for seed, (name, shape) in enumerate(SHAPES.items(), start=1):
        folders[name] = out / name
        make_model(folders[name], shape, vocab, tokenizer, seed)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(f"w{(i * 7 + j) % (vocab - 4)}"
                                                              for j in range(12))}) + "\n"
                               for i in range(64)))
    folders["prompts"] = prompts
    return folders


def step_seconds(folders: dict[str, Path], teacher: str, out: Path, steps: int,
                 objective: str) -> list[float]:
    from opd import metrics as M
    from opd.config.training import build_config
    from opd.run.loop import run_training

    shutil.rmtree(out, ignore_errors=True)
    run_training(build_config({
        "student": str(folders["student"]), "teacher": teacher,
        "prompts": str(folders["prompts"]), "out": str(out), "max_steps": steps + 1,
        "prompts_per_step": 16, "samples_per_prompt": 4, "max_new_tokens": 32,
        "lr": 1e-4, "objective.name": objective, "objective.k": 16, "measure_k": 16,
        "save_every": 1000, "progress": False, "dtype": "float32", "template": "{prompt}",
    }))
    records = M.read(out)[1:]  # the first step warms up
    keys = (M.TIME_ROLLOUT, M.TIME_SCORE, M.TIME_UPDATE)
    return [sum(r[k] for k in keys) for r in records]


@contextlib.contextmanager
def serving(teacher: Path, backend: str = "hf"):
    """`opd serve-teacher` on `teacher` as its own process; yields its URL once it answers."""
    from opd.teachers.client import TeacherClient

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    server = subprocess.Popen([sys.executable, "-m", "opd", "serve-teacher", "--model",
                               str(teacher), "--port", str(port), "--dtype", "float32",
                               "--backend", backend], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        TeacherClient(url, timeout=300).info()  # waits for the server to come up
        yield url
    finally:
        server.terminate()
        server.wait(30)


def score_request(vocab: int, candidates: bool):
    """64 random sequences of 96 tokens, the last 64 scored at k = 16 (with 16 random
    candidate ids per position when `candidates`), and the number of scored tokens."""
    from opd.teachers.protocol import ScoreRequest

    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(4, vocab, (64, 96), generator=generator).tolist()
    starts = [32] * len(sequences)
    ids = [torch.randint(4, vocab, (64, 16), generator=generator).tolist() for _ in sequences]
    tokens = sum(len(s) - start for s, start in zip(sequences, starts, strict=True))
    return ScoreRequest(sequences, starts, 16, 1.0, ids if candidates else None), tokens


def alternated_rates(runs: dict, tokens: int, rounds: int) -> dict[str, float]:
    """Median tokens/s of each run, after a warm-up, the runs alternated one at a time."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            rates[name].append(tokens / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in rates.items()}


def scoring_throughput(teacher: Path, url: str, vocab: int, rounds: int) -> dict[str, float]:
    """Scored tokens/s: the server over HTTP, and the same backend in process."""
    from opd.teachers.client import TeacherClient
    from opd.teachers.server import HFBackend

    request, tokens = score_request(vocab, candidates=True)
    client = TeacherClient(url, timeout=120)
    backend = HFBackend(str(teacher), dtype="float32", device=torch.device("cpu"))
    return alternated_rates({"http": lambda: client.score(request),
                             "in_process": lambda: backend.score(request)}, tokens, rounds)


def backend_throughput(out: Path, vocab: int, rounds: int) -> dict[str, float]:
    """The server's scored tokens/s over HTTP with each backend, on one teacher (one server
    at a time: the machine's cores go to one backend)."""
    from opd.teachers.client import TeacherClient

    teacher = out / "teacher-64"
    make_model(teacher, VLLM_TEACHER, vocab, make_tokenizer(vocab), 3)
    request, tokens = score_request(vocab, candidates=False)
    rates = {}
    for backend in ("hf", "vllm"):
        with serving(teacher, backend) as url:
            score = TeacherClient(url, timeout=300).score
            rates.update(alternated_rates({backend: lambda score=score: score(request)},
                                          tokens, rounds))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--vllm", action="store_true",
                        help="measure the hf and vllm backends' scored tokens/s instead")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if args.vllm:
        rates = backend_throughput(out, args.vocab, args.rounds)
        print(f"threads: {torch.get_num_threads()}, vocab {args.vocab}, teacher {VLLM_TEACHER} "
              f"(hidden, layers, heads, mlp), float32; scored tokens/s over HTTP, median of "
              f"{args.rounds} requests of 64 × 64 response tokens (k 16, no candidates): "
              + ", ".join(f"{name} backend {rate:.0f}" for name, rate in rates.items()))
        return
    folders = build(out, args.vocab)
    with serving(folders["teacher"]) as url:
        rows = []
        for objective in ("topk", "sampled"):
            times: dict[str, list[float]] = {"local": [], "served": []}
            for _ in range(args.repeats):
                for name, teacher in (("local", str(folders["teacher"])), ("served", url)):
                    times[name] += step_seconds(folders, teacher, out / name, args.steps,
                                                objective)
            local, served = (statistics.median(times[n]) for n in ("local", "served"))
            rows.append({"objective": objective, "in_process_s": local, "served_s": served,
                         "ratio": served / local})
        rates = scoring_throughput(folders["teacher"], url, args.vocab, args.rounds)
    print(f"threads: {torch.get_num_threads()}, vocab {args.vocab}, student {SHAPES['student']}, "
          f"teacher {SHAPES['teacher']} (hidden, layers, heads, mlp); 16 prompts × 4 rollouts "
          f"× 32 new tokens per step; median of {args.repeats} × {args.steps} steps each")
    print("| objective | step, in-process teacher (s) | step, served teacher (s) | ratio |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['objective']} | {row['in_process_s']:.3f} | {row['served_s']:.3f} | "
              f"{row['ratio']:.2f}× |")
    print(f"\nscored tokens/s, median of {args.rounds} alternated requests of 64 × 64 response "
          "tokens (k 16 + 16 candidates): over HTTP "
          f"{rates['http']:.0f}, same backend in process {rates['in_process']:.0f}")


if __name__ == "__main__":
    main()
