#!/usr/bin/env bash
# Set up (if needed) and run the main CPU job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/unmask generate --model tiny-block --prompt "1203" --trace sampler.gen_length=16 "$@"
