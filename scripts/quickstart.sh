#!/usr/bin/env bash
# Set up .venv (if needed) and run the main CPU job: `unmask quickstart` trains a tiny diffusion
# model on 4x4 Sudoku (SFT), evaluates it on held-out puzzles, runs TraceRL, evaluates again and
# prints the before/after table. Arguments go to `unmask quickstart` (e.g. --objective agrpo).
# Running it again after an interruption resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
UNMASK_NO_BROWSER=1 bash scripts/setup.sh  # the browser is only for a test
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
echo "setup: done; starting unmask quickstart" >&2
exec .venv/bin/unmask quickstart "$@"
