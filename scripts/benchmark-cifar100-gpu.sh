#!/usr/bin/env bash
# The real-data benchmark on one GPU (configs/cifar100-gpu.yaml: DeiT-T/DeiT-S widths, conv tokenizer, bf16).
# Usage: scripts/benchmark-cifar100-gpu.sh [CIFAR100_TREE_OR_TGZ] [PRETRAIN_TREE_OR_TGZ] [more options]
#   e.g. `... --scale 0.01` for a smoke run (on a CPU too: device auto falls back to it).
# Records the GPU and its power/utilisation every 5 s beside the tables (OUT/gpu.csv, OUT/nvidia-smi.csv),
# then runs scripts/benchmark-cifar100.sh with this config into OUT (default runs/cifar100-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
export CONFIG=configs/cifar100-gpu.yaml OUT=${OUT:-runs/cifar100-gpu}
mkdir -p "$OUT"
SMI=""
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv | tee "$OUT/gpu.csv"
  nvidia-smi --query-gpu=timestamp,power.draw,utilization.gpu,memory.used --format=csv -l 5 > "$OUT/nvidia-smi.csv" &
  SMI=$!
fi
trap '[ -n "$SMI" ] && kill "$SMI" 2>/dev/null || true' EXIT
./scripts/benchmark-cifar100.sh "$@"
