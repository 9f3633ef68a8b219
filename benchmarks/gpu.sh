#!/usr/bin/env bash
# The GPU figures of docs/BENCHMARKS.md: Infinity-2B and -8B architectures (random weights), bf16, 1024x1024 (1M),
# batch 1 and 8, at the paper's fixed operating point; then batch 1 with the adaptive rules.
# Run from the repository root on an H100/H200-class machine:  bash benchmarks/gpu.sh [out_dir]
# PYTHON defaults to .venv/bin/python when present, else python3 (e.g. a CUDA build of torch on the GPU machine).
set -euo pipefail
out=${1:-${OUT:-out}/gpu}
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$py" -c "import torch, pydantic; assert torch.cuda.is_available(), 'CUDA is not available'" \
  || { echo "gpu.sh needs $py with a CUDA build of torch and pydantic (v2)" >&2; exit 2; }
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/nvidia-smi.csv"
for config in infinity-2b infinity-8b; do
  for batch in 1 8; do
    "$py" benchmarks/run.py --config "$config" --pn 1M --batch "$batch" --dtype bfloat16 --device cuda \
      --operating-point paper --warmup 2 --repeats 5 --out "$out/${config}_b${batch}_paper"
  done
  "$py" benchmarks/run.py --config "$config" --pn 1M --batch 1 --dtype bfloat16 --device cuda \
    --pass-sets none,lhep+sats --warmup 2 --repeats 5 --out "$out/${config}_b1_adaptive"
done
