#!/usr/bin/env bash
# One prepared GPU check (run on a CUDA machine from the repo root; writes to ${OUT:-gpu-out}):
#  1. the CUDA path of the core tests (scoring, objectives, measures, training loop, resume);
#  2. the objective memory bench at the study's sizes (vocabulary 151,936, hidden 2048, 16K tokens);
#  3. wall time of `opd train` steps on random ~0.5B / ~1.5B-parameter Llama shapes in bf16,
#     synchronous and with the rollouts of the next step sampled during the update (max_staleness 1);
#  4. seconds per step beside TRL's DistillationTrainer (needs the trl extra), tiny, small and large rows;
#  5. FSDP2 + bf16 mixed precision on one GPU (a one-process torchrun launch) beside the plain
#     float32 process: per-process parameter, gradient and AdamW bytes and seconds per step;
#  6. with vLLM installed (the vllm extra): the vLLM engine tests (tests_vllm/, on CUDA: sleep mode
#     included) and rollout tokens/s of opd's sampler, the vLLM engine and plain vLLM generate on a
#     ~0.5B random Llama, 256 rollouts × 1,024 tokens (goal: engine ≥ 5× hf, ≥ 80% of plain).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/env.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_objectives.py tests/test_measures.py \
  tests/test_scoring.py tests/test_train.py tests/test_async.py 2>&1 | tail -n 15 | tee "$OUT/tests.txt"
python3 bench/objective_memory.py --tokens 1024 4096 16384 2>&1 | tee "$OUT/bench.txt"
python3 bench/opd_step.py --out "$OUT/opd_step" 2>&1 | tee "$OUT/opd_step.txt"
python3 bench/opd_step.py --out "$OUT/opd_step_async" --steps 4 --max-staleness 1 2>&1 \
  | tee "$OUT/opd_step_async.txt"
python3 bench/vs_trl.py --rows tiny small large --pairs 3 --steps 6 2>&1 | tee "$OUT/vs_trl.txt"
python3 bench/sharding.py --large --rows one fsdp-bf16-1 2>&1 | tee "$OUT/sharding.txt"
if python3 -c "import vllm" 2>/dev/null; then
  python3 -m pytest -q -p no:cacheprovider tests_vllm 2>&1 | tail -n 15 | tee "$OUT/tests_vllm.txt"
  python3 bench/rollout_engines.py --shape 0.5b --rollouts 256 --max-new-tokens 1024 \
    --dtype bfloat16 2>&1 | tee "$OUT/rollout_engines.txt"
else
  echo 'vllm is not installed: pip install "opd[vllm]" for the vLLM rows' | tee "$OUT/rollout_engines.txt"
fi
