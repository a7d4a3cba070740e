#!/usr/bin/env bash
# The real-data benchmark on one GPU (configs/cifar100-gpu.yaml: DeiT-T/DeiT-S widths, conv tokenizer, bf16).
# Usage: scripts/benchmark-cifar100-gpu.sh [CIFAR100_TREE_OR_TGZ] [PRETRAIN_TREE_OR_TGZ] [more options]
#   e.g. `... --scale 0.01` for a smoke run (on a CPU too: device auto falls back to it).
# Prints the GPU, runs setup and the benchmark into runs/cifar100-gpu/, and leaves nvidia-smi's
# power/utilisation samples beside the tables (runs/cifar100-gpu/nvidia-smi.csv) when a GPU is there.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
DATA=${1:-../shared/data/cifar100-png.tar.gz}
PRETRAIN=${2:-../shared/data/tinyimagenet-other100-32px.tar.gz}
shift $(( $# < 2 ? $# : 2 ))
OUT=${OUT:-runs/cifar100-gpu}
./scripts/setup.sh
mkdir -p "$OUT"
SMI=""
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv | tee "$OUT/gpu.csv"
  nvidia-smi --query-gpu=timestamp,power.draw,utilization.gpu,memory.used --format=csv -l 5 > "$OUT/nvidia-smi.csv" &
  SMI=$!
fi
trap '[ -n "$SMI" ] && kill "$SMI" 2>/dev/null || true' EXIT
.venv/bin/python benchmarks/cifar100_cpu.py --config configs/cifar100-gpu.yaml \
  --data "$DATA" --pretrain-data "$PRETRAIN" --out "$OUT" "$@"
