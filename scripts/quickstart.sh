#!/usr/bin/env bash
# Set up (if needed) and run the main CPU job: SFT a tiny model on Sudoku, evaluate, TraceRL,
# evaluate again. Extra arguments go to the RL command (e.g. max_steps=10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
out=${OUT:-runs/quickstart}
u=.venv/bin/unmask
if [ ! -d "$out/sft/final" ]; then
  $u sft configs/sft_sudoku_tiny.yaml max_steps=250 save_every=0 eval.every=0 output_dir="$out/sft"
fi
$u eval configs/eval_sudoku_tiny.yaml model="$out/sft/final" limit=256 output_dir="$out/eval_sft"
resume=(); [ -d "$out/rl/checkpoints" ] && resume=(--resume)
$u rl configs/rl_tracerl_sudoku_tiny.yaml model="$out/sft/final" output_dir="$out/rl" \
  max_steps=20 save_every=5 eval.every=0 "${resume[@]}" "$@"
$u eval configs/eval_sudoku_tiny.yaml model="$out/rl/final" limit=256 output_dir="$out/eval_rl"
