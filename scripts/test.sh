#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, then the linter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python -m pytest -q "$@"
.venv/bin/ruff check src tests $( [ -d benchmarks ] && echo benchmarks )
