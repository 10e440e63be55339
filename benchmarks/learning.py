"""Which RL objective teaches most in the same wall-clock budget, from the same SFT model?

For each task, the quickstart recipe's SFT model is trained once (or taken from the quickstart
cache), evaluated on the held-out split, then every objective runs RL from it for the same
number of seconds with each seed and is evaluated on the same held-out rows. Prints one JSON
line per (task, objective, seed) and one summary line per (task, objective) with the mean and
spread of the final accuracy.

    python benchmarks/learning.py                                   # both tasks, 3 seeds
    python benchmarks/learning.py --tasks sudoku --budget-s 60 --seeds 1 --objectives tracerl
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def start_model(task: str, args: argparse.Namespace, work: Path) -> tuple[Path, dict]:
    """The recipe's SFT model (cached by recipe) and its held-out evaluation."""
    from unmask.quickstart import QuickstartConfig, _copy_model, _is_model, plan
    from unmask.train.sft import SFTTrainer

    config = QuickstartConfig(task=task, output_dir=str(work / task), progress=False,
                              cache_dir=args.cache_dir)  # fmt: skip
    p = plan(config)
    if not _is_model(p.sft_cache):
        final = SFTTrainer(p.sft).train()
        _copy_model(final, p.sft_cache)
    return p.sft_cache, evaluate(task, p, p.sft_cache, args)


def evaluate(task: str, p, model_dir: Path, args: argparse.Namespace) -> dict:
    """Held-out accuracy in both quickstart modes: ``accuracy`` sampled at the RL temperature
    (the policy RL trains; the headline) and ``greedy_accuracy``."""
    from unmask.eval.evaluate import evaluate as run
    from unmask.models.diffusion_lm import DiffusionLM
    from unmask.tasks.registry import build_task

    model = DiffusionLM.from_pretrained(str(model_dir))
    data = build_task(task, p.task_options, model.tokenizer)
    out: dict = {}
    for mode, sampler in p.eval_samplers.items():
        summary = run(model, data, sampler, limit=args.eval_limit, batch_size=256, seed=0,
                      progress=False)  # fmt: skip
        prefix = "" if mode == "sampled" else f"{mode}_"
        out.update({f"{prefix}accuracy": summary["accuracy"],
                    f"{prefix}ci95": summary["accuracy_ci95"]})  # fmt: skip
    return out


def run_rl(task: str, objective: str, seed: int, start: Path, args, work: Path) -> dict:
    from unmask.quickstart import QuickstartConfig, plan
    from unmask.train.rl import RLTrainer

    config = QuickstartConfig(task=task, objective=objective, seed=seed, progress=False,
                              output_dir=str(work / f"{task}-{objective}-{seed}"))  # fmt: skip
    p = plan(config)
    rl = replace(p.rl, model=str(start), max_steps=100_000, max_time_s=args.budget_s,
                 save_every=0, eval=replace(p.rl.eval, every=0))  # fmt: skip
    began = time.perf_counter()
    final = RLTrainer(rl).train()
    wall = time.perf_counter() - began
    lines = (Path(rl.output_dir) / "metrics.jsonl").read_text().splitlines()
    steps = max(json.loads(line)["step"] for line in lines)
    return {"steps": steps, "rl_s": wall, **evaluate(task, p, final, args)}


def main() -> None:
    from unmask.objectives import OBJECTIVES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["sudoku", "countdown"])
    parser.add_argument("--objectives", nargs="+", default=sorted(OBJECTIVES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=120.0, help="RL seconds per run")
    parser.add_argument("--eval-limit", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None, help="SFT cache (the quickstart's)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="unmask-learning-") as tmp:
        work = Path(tmp)
        for task in args.tasks:
            start, before = start_model(task, args, work)
            print(json.dumps({"task": task, "objective": "sft (start)", **before}), flush=True)
            for objective in args.objectives:
                finals, greedy = [], []
                for seed in range(args.seeds):
                    result = run_rl(task, objective, seed, start, args, work)
                    finals.append(result["accuracy"])
                    greedy.append(result["greedy_accuracy"])
                    line = {"task": task, "objective": objective, "seed": seed,
                            "budget_s": args.budget_s, **result}  # fmt: skip
                    print(json.dumps(line), flush=True)
                print(json.dumps({
                    "task": task, "objective": objective, "summary": True,
                    "start_accuracy": before["accuracy"],
                    "mean_accuracy": statistics.fmean(finals),
                    "std_accuracy": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                    "min_accuracy": min(finals), "max_accuracy": max(finals),
                    "start_greedy_accuracy": before["greedy_accuracy"],
                    "mean_greedy_accuracy": statistics.fmean(greedy),
                    "seeds": len(finals), "budget_s": args.budget_s,
                }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
