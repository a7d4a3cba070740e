#!/usr/bin/env bash
# Set up (if needed), lint, type-check and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
./scripts/setup.sh dev
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy src
.venv/bin/python -m pytest -q "$@"
