#!/usr/bin/env bash
# JAX (this library) vs the PyTorch baseline, one ConVIRT train step, same GPU, same shapes.
# Usage: bash bench/gpu_suite.sh [OUT_FILE]   (each line printed is one JSON result)
set -uo pipefail
out=${1:-/dev/stdout}
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
for args in "--batch=32 --dtype=float32" "--batch=32 --dtype=bfloat16" \
            "--batch=128 --dtype=bfloat16" "--batch=256 --dtype=bfloat16"; do
  python3 bench/train_step.py --text=bert-base --steps=20 $args 2>/dev/null | grep '^{' | tee -a "$out"
done
for args in "--batch=32" "--batch=32 --amp" "--batch=128 --amp --channels_last" \
            "--batch=256 --amp --channels_last" "--batch=256 --amp --channels_last --compile"; do
  python3 bench/torch_convirt_step.py --text=bert-base --steps=20 $args 2>/dev/null | grep '^{' | tee -a "$out"
done
