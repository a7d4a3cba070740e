#!/usr/bin/env bash
# Create .venv (if missing) and install askexpert with its pinned dependencies.
# Usage: scripts/setup.sh [EXTRAS]   default `train,serve` (what the demo runs); `dev` adds Ray and the
# test tools. The edge alone is the core install: `pip install askexpert` (no torch; README, "The edge").
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # The pinned torch is a CUDA build: a new .venv takes about 6.5 GB. Say so up front
  # instead of letting pip die half-way with "No space left on device".
  need_kb=$((7 * 1024 * 1024))
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ -n "$free_kb" ] && [ "$free_kb" -lt "$need_kb" ]; then
    echo "setup: only $((free_kb / 1024)) MiB free on $(df -P . | awk 'NR==2 {print $6}');" \
      "a new .venv needs about 7 GiB (torch 2.14.1 is a CUDA build). Free some space and rerun." >&2
    exit 1
  fi
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1).
.venv/bin/python -m pip install --quiet -e ".[${1:-train,serve}]"
