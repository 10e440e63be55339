"""Does ``unmask rl`` raise a DiffusionGemma's held-out reward on CPU? Before and after, numbers.

``unmask sft`` does not take a DiffusionGemma, so the run starts from a random-init preset and
RL alone must find the signal: the recipe (configs/rl_sudoku_diffusion_gemma_tiny.yaml, the
same ``key=value`` overrides as ``unmask rl``) is evaluated on held-out rows before RL, trained
for its ``max_steps``, and evaluated again on the same rows with the same seeded step sampler
(the model has no greedy decoding). Prints one JSON line per measurement: ``before``, ``after``
(reward mean with a normal 95% interval over samples, each reward's mean, accuracy with its
Wilson interval), ``train`` (steps, wall seconds, the first and last steps' rollout reward)
and ``config`` (the settings that matter).

    python benchmarks/diffusion_gemma_rl.py                         # the recipe, ~6 min, 1 core
    python benchmarks/diffusion_gemma_rl.py max_steps=20 lr=3e-3    # any recipe field
    python benchmarks/diffusion_gemma_rl.py --eval-limit 64 --config other.yaml
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "rl_sudoku_diffusion_gemma_tiny.yaml"


def emit(record: dict[str, Any]) -> None:
    def short(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, list):
            return [short(x) for x in v]
        return v

    print(json.dumps({k: short(v) for k, v in record.items()}), flush=True)


def mean_ci95(values: list[float]) -> tuple[float, list[float]]:
    """Mean and normal 95% interval (the rewards are bounded fractions; n is in the hundreds)."""
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, [mean - half, mean + half]


def held_out(model, config, limit: int, out: Path) -> dict[str, Any]:
    """Reward and accuracy on the first ``limit`` rows of the eval split, sampled with the
    recipe's ``eval.step_sampler`` and seed 0 (the same draws before and after)."""
    from unmask.eval.evaluate import evaluate
    from unmask.tasks.registry import build_task

    task = build_task(config.data.task, config.data.options, model.tokenizer)
    summary = evaluate(model, task, config.eval.sampler, split=config.eval.split, limit=limit,
                       batch_size=config.eval.batch_size, output_dir=out, seed=0,
                       progress=False, step_sampler=config.eval.step_sampler)  # fmt: skip
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    reward, ci = mean_ci95([r["reward"] for r in records if r["reward"] is not None])
    line = {"reward": reward, "reward_ci95": ci, "accuracy": summary["accuracy"],
            "accuracy_ci95": summary["accuracy_ci95"],
            "samples": summary["num_samples"]}  # fmt: skip
    for name in task.reward_names:
        line[name] = summary[f"reward/{name}/mean"]
    line.update(mean_nfe=summary["mean_nfe"], eval_s=summary["wall_s"],
                examples=[r["completion"] for r in records[:3]])  # fmt: skip
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="recipe fields, key.sub=value")
    parser.add_argument("--config", default=str(RECIPE))
    parser.add_argument("--eval-limit", type=int, default=256, help="held-out rows")
    parser.add_argument("--keep", help="write the run here (default: a temporary folder)")
    args = parser.parse_args()

    import torch

    from unmask.config import load_config
    from unmask.models.loading import load_model
    from unmask.train.rl import RLTrainer
    from unmask.train.rl_config import RLConfig

    config = load_config(RLConfig, args.config, args.overrides)
    torch.set_num_threads(config.cpu_threads or 1)
    with tempfile.TemporaryDirectory(prefix="unmask-dg-rl-") as tmp:
        work = Path(args.keep or tmp)
        config.output_dir, config.progress, config.plots = str(work / "run"), False, False
        s = config.step_sampler
        emit({"kind": "config", "model": config.model, "task": config.data.task,
              "options": config.data.options, "objective": config.objective,
              "max_steps": config.max_steps, "lr": config.lr, "num_prompts": config.num_prompts,
              "num_generations": config.num_generations, "beta": config.beta,
              "canvas": s.max_new_tokens, "denoising_steps": s.max_denoising_steps,
              "entropy_bound": s.entropy_bound, "t": [s.t_min, s.t_max],
              "eval_rows": args.eval_limit, "threads": torch.get_num_threads()})  # fmt: skip
        start = load_model(config.model, device="cpu")
        emit({"kind": "before", "parameters": sum(p.numel() for p in start.parameters()),
              **held_out(start, config, args.eval_limit, work / "eval_before")})  # fmt: skip
        del start
        began = time.perf_counter()
        final = RLTrainer(config).train()
        wall = time.perf_counter() - began
        metrics = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        rewards = [m["reward"] for m in metrics if "reward" in m]
        k = max(1, min(5, len(rewards) // 4))
        emit({"kind": "train", "steps": len(rewards), "wall_s": wall,
              "s_per_step": wall / max(len(rewards), 1),
              f"rollout_reward_first{k}": statistics.fmean(rewards[:k]),
              f"rollout_reward_last{k}": statistics.fmean(rewards[-k:])})  # fmt: skip
        after = held_out(load_model(str(final), device="cpu"), config, args.eval_limit,
                         work / "eval_after")  # fmt: skip
        emit({"kind": "after", "steps": len(rewards), "rl_wall_s": wall, **after})


if __name__ == "__main__":
    main()
