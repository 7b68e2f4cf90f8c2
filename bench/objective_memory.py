"""Peak memory and time of one OPD objective step: chunked (opd.step.scoring) vs naive.

The step: student logits from hidden states (with gradient), teacher logits (without),
top-k reverse-KL objective and the study's measures, backward to the student's hidden
states (the output matrices' own gradients are the same for both ways and left out).
"naive" holds both models' full [tokens, vocab] log-softmax at once; "chunked" is what
`opd train` does. Each measurement runs in a fresh process and reports the peak memory
beyond its inputs (peak RSS on CPU, peak allocated memory on CUDA). A naive row that would
not fit in this machine's memory is extrapolated linearly in tokens from the largest naive
run instead, and marked so.

    python bench/objective_memory.py                 # sizes the tests use + the 151,936 vocabulary
    python bench/objective_memory.py --tokens 16384  # the study's response length (slow on CPU)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time

import torch

GIB = 1024**3


def build(vocab: int, hidden: int, tokens: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    student_head = torch.nn.Linear(hidden, vocab, bias=False).to(device, dtype).requires_grad_(False)
    teacher_head = torch.nn.Linear(hidden, vocab, bias=False).to(device, dtype).requires_grad_(False)
    student_hidden = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_(True)
    teacher_hidden = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    return student_head, teacher_head, student_hidden, teacher_hidden, targets


def step(mode: str, inputs, chunk: int) -> None:
    from opd.config.training import ObjectiveConfig
    from opd.step.measures import token_measures
    from opd.step.objectives import TokenLoss, distillation_loss
    from opd.step.scoring import ResponseStates, score

    s_head, t_head, s_hidden, t_hidden, targets = inputs
    tokens, device = s_hidden.shape[0], s_hidden.device
    objective = ObjectiveConfig(name="topk", k=16)
    weight = torch.full((tokens,), 1.0 / tokens, device=device)
    if mode == "chunked":
        positions = torch.arange(tokens, device=device)

        def states(h):
            return ResponseStates(h, targets, positions, positions)

        loss = score(
            states(s_hidden), states(t_hidden),
            student_head=lambda h: s_head(h).float(), teacher_head=lambda h: t_head(h).float(),
            loss=TokenLoss(objective, weight=weight),
            measures=lambda sp, tp, y: token_measures(sp, tp, y, 16), chunk_size=chunk,
        ).loss
    else:
        student_lp = s_head(s_hidden).float().log_softmax(-1)
        with torch.no_grad():
            teacher_lp = t_head(t_hidden).float().log_softmax(-1)
        loss = (weight * distillation_loss(student_lp, teacher_lp, targets, objective)).sum()
        token_measures(student_lp, teacher_lp, targets, 16)
    loss.backward()


def measure(mode, vocab, hidden, tokens, chunk, device, queue) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    # warm-up on a small size so library initialisation is not counted as the objective's cost
    step(mode, build(min(vocab, 1000), 64, 64, device), chunk)
    inputs = build(vocab, hidden, tokens, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_cpu = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base_cuda = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    start = time.perf_counter()
    step(mode, inputs, chunk)
    if device == "cuda":
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base_cuda
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_cpu
    queue.put((extra, time.perf_counter() - start))


def available_bytes(device: str) -> float:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def run(mode, vocab, hidden, tokens, chunk, device):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(mode, vocab, hidden, tokens, chunk, device, queue))
    proc.start()
    proc.join()
    return queue.get() if proc.exitcode == 0 else (float("nan"), float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[64, 1024])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    sizes = [(31, 32, 64)]  # the tiny test models: vocab, hidden, tokens
    sizes += [(args.vocab, args.hidden, t) for t in args.tokens]
    print(f"device: {args.device} ({torch.get_num_threads()} threads), chunk {args.chunk} positions,"
          " top-k 16 objective + measures, forward + backward")
    print(f"{'vocab':>8} {'hidden':>6} {'tokens':>6} | {'chunked GiB':>11} {'s':>7} | "
          f"{'naive GiB':>10} {'s':>7}")
    bytes_per_token = 5 * 4 * args.vocab  # before any naive run: five float32 vocab rows
    for vocab, hidden, tokens in sizes:
        chunked = run("chunked", vocab, hidden, tokens, args.chunk, args.device)
        estimate = bytes_per_token * tokens
        if vocab != args.vocab or estimate < 0.5 * available_bytes(args.device):
            naive = run("naive", vocab, hidden, tokens, args.chunk, args.device)
            naive_text = f"{naive[0] / GIB:>10.3f} {naive[1]:>7.2f}"
            if vocab == args.vocab:
                bytes_per_token = naive[0] / tokens
        else:
            naive_text = f"{estimate / GIB:>9.1f}* {'-':>7}"
        print(f"{vocab:>8} {hidden:>6} {tokens:>6} | {chunked[0] / GIB:>11.3f} {chunked[1]:>7.2f} | "
              f"{naive_text}", flush=True)
    print("* not run (would not fit in memory): extrapolated linearly in tokens from the largest "
          "naive run above")


if __name__ == "__main__":
    main()
