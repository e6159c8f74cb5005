#!/usr/bin/env bash
# The GPU figures BENCHMARKS.md lacks, in one run on a GPU machine (prepared, not yet run:
# no GPU has been lent to this project so far). From the repository root:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # default benchmarks/results/gpu
#
# 1. the real SmolLM2-135M (converted once from ../shared/data/smollm2-135m, ~540 MB,
#    into $QUIETSTAR_SMOLLM2 or ~/.cache/quietstar/smollm2-135m-hf), bfloat16 compute,
#    float32 masters, 8 sequences of 512 tokens: step time, tokens/s, MFU, peak memory;
# 2. a 1B-class Llama (TinyLlama-1.1B shapes + 2 thought tokens, random weights), the
#    same settings with full rematerialisation;
# 3. the 1B step again with cuDNN's fused attention in the base pass.
# Each writes its JSON to OUT_DIR and prints its figures; the card's name is in the JSON
# (`env.device_kind`). Record them in BENCHMARKS.md ("GPU") with that name.
set -euo pipefail
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
SMOL=${QUIETSTAR_SMOLLM2:-$HOME/.cache/quietstar/smollm2-135m-hf}
if [ ! -d "$SMOL" ]; then
  python -m pip install -q gguf accelerate
  python ../shared/data/smollm2-135m/to_hf.py "$SMOL"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
QUIETSTAR_SMOLLM2=$SMOL python benchmarks/step_benchmark.py --preset gpu-smollm2 \
  --sweep none --out "$OUT/step_gpu_smollm2.json"
python benchmarks/step_benchmark.py --preset gpu-1b --sweep none \
  --out "$OUT/step_gpu_1b.json"
python benchmarks/step_benchmark.py --preset gpu-1b --sweep none --attention cudnn \
  --out "$OUT/step_gpu_1b_cudnn.json"
