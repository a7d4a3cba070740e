#!/usr/bin/env bash
# Set up (if needed) and run the whole demo on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
./scripts/setup.sh
.venv/bin/askexpert demo "$@"
