"""Block-size adaptation on 4x4 Sudoku: a block-4 model moved to block 8.

TraceRL moved TraDo from block 4 to larger blocks so that dynamic (threshold) decoding commits
more tokens per forward. This script does the same on a CPU scale and prints one JSON line per
measurement:

1. ``train``: SFT of ``nano-block`` at its native block 4 (the starting model), then two short
   adaptations from it at block 8: TraceRL (``block_size: 8``) and, for comparison, SFT
   continued at block 8;
2. ``eval``: for each model (start, and each adapted one) at block 4 and block 8, greedy
   held-out accuracy (with its 95% interval) and NFE per token (forwards per decoded token),
   under static decoding (one token per step) and dynamic decoding (confidence threshold).

    python benchmarks/block_adaptation.py --out /tmp/block_adapt
    python benchmarks/block_adaptation.py --start /tmp/block_adapt/sft_b4/final --rl-lr 5e-4 \
        --adapt-sft-steps 0 --out /tmp/block_adapt_lr   # another RL arm from the same start
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from unmask.eval.evaluate import evaluate
from unmask.models import DiffusionLM
from unmask.sampling import SamplerConfig
from unmask.tasks.registry import get_task
from unmask.train.rl import RLTrainer
from unmask.train.rl_config import RLConfig, RLData
from unmask.train.sft import SFTConfig, SFTData, SFTTrainer

TASK = {"blanks": 6}
GEN_LENGTH = 24  # 16 digits + EOS, a multiple of both blocks


def emit(record: dict[str, Any]) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}),
          flush=True)  # fmt: skip


def sft(out: Path, model: str, steps: int, block: int | None, lr: float, warmup: int) -> Path:
    config = SFTConfig(model=model, output_dir=str(out), data=SFTData(task="sudoku", options=TASK),
                       block_size=block, max_steps=steps, batch_size=64, lr=lr,
                       warmup_steps=warmup, log_every=50, progress=False, plots=False)  # fmt: skip
    return SFTTrainer(config).train()


def rl(out: Path, model: str, steps: int, block: int, lr: float) -> Path:
    config = RLConfig(model=model, output_dir=str(out), data=RLData(task="sudoku", options=TASK),
                      block_size=block, max_steps=steps, num_prompts=8, num_generations=8,
                      lr=lr, sampler=SamplerConfig(gen_length=GEN_LENGTH, temperature=1.0),
                      progress=False, plots=False)  # fmt: skip
    return RLTrainer(config).train()


def measure(name: str, path: Path, puzzles: int, threshold: float) -> None:
    model = DiffusionLM.from_pretrained(path, dtype="float32", device="cpu")
    task = get_task("sudoku", **TASK)
    native = model.block_size
    for block in (4, 8):
        for decoding in ("static", "dynamic"):
            sampler = SamplerConfig(gen_length=GEN_LENGTH, block_length=block, temperature=0.0,
                                    remasking="threshold" if decoding == "dynamic"
                                    else "low_confidence", threshold=threshold)  # fmt: skip
            began = time.perf_counter()
            s = evaluate(model, task, sampler, limit=puzzles, batch_size=puzzles, progress=False)
            emit({"phase": "eval", "model": name, "native_block": native, "block": block,
                  "decoding": decoding, "accuracy": s["accuracy"],
                  "ci95": [round(x, 3) for x in s["accuracy_ci95"]],
                  "nfe_per_token": 1.0 / s["tokens_per_step"],
                  "tokens_per_step": s["tokens_per_step"], "cells": s["reward/sudoku_cells/mean"],
                  "puzzles": puzzles, "eval_s": time.perf_counter() - began})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench_block_adaptation")
    parser.add_argument("--start", help="a block-4 model to adapt (default: SFT one first)")
    parser.add_argument("--sft-steps", type=int, default=500)
    parser.add_argument("--rl-steps", type=int, default=40)
    parser.add_argument("--rl-lr", type=float, default=1e-4)
    parser.add_argument("--adapt-sft-steps", type=int, default=100, help="0: no SFT arm")
    parser.add_argument("--puzzles", type=int, default=256)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    arms = []
    began = time.perf_counter()
    if args.start:
        start = Path(args.start)
    else:
        start = sft(out / "sft_b4", "nano-block", args.sft_steps, None, 3e-3, 50)
        emit({"phase": "train", "model": "start", "how": "SFT at block 4",
              "steps": args.sft_steps, "wall_s": time.perf_counter() - began})  # fmt: skip
    arms.append(("start", start))
    began = time.perf_counter()
    arms.append(("tracerl_b8", rl(out / "rl_b8", str(start), args.rl_steps, 8, args.rl_lr)))
    emit({"phase": "train", "model": "tracerl_b8", "how": "TraceRL at block 8",
          "steps": args.rl_steps, "wall_s": time.perf_counter() - began})  # fmt: skip
    if args.adapt_sft_steps:
        began = time.perf_counter()
        adapted = sft(out / "sft_b8", str(start), args.adapt_sft_steps, 8, 1e-3, 0)
        arms.append(("sft_b8", adapted))
        emit({"phase": "train", "model": "sft_b8", "how": "SFT continued at block 8",
              "steps": args.adapt_sft_steps, "wall_s": time.perf_counter() - began})  # fmt: skip
    for name, path in arms:
        measure(name, path, args.puzzles, args.threshold)


if __name__ == "__main__":
    main()
