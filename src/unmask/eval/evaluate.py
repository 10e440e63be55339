"""Evaluation: generate on a task split, score, and report accuracy, pass@k and decoding cost.

Writes every generation (prompt, completion, token ids, trace, rewards) as JSONL and a summary
JSON, so a run can be inspected or re-scored later without sampling again.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from unmask.eval.sweep import EvalSweep, run_sweep
from unmask.models.loading import DiffusionModel, load_model
from unmask.rewards.process import trace_columns
from unmask.sampling.for_model import sampler_for
from unmask.sampling.sampler import SamplerConfig
from unmask.sampling.step_sampler import StepSamplerConfig
from unmask.tasks.base import Task, reward_total


@dataclass
class EvalConfig:
    """``unmask eval``: a model, a task split, and how to sample it.

    ``sweep`` (steps per block and/or thresholds) evaluates once per setting instead, into
    ``output_dir/<setting>``, and writes the accuracy-vs-NFE table and plot there.
    ``step_sampler`` replaces ``sampler`` for a uniform-noise model (DiffusionGemma).
    """

    model: str = "tiny-block"
    task: str = "sudoku"
    task_options: dict[str, Any] = field(default_factory=dict)
    split: str = "test"
    limit: int | None = None  # evaluate the first `limit` rows only
    num_generations: int = 1  # samples per prompt; pass@k for k = num_generations
    batch_size: int = 32
    output_dir: str | None = None
    report: bool = False  # also write trace.html and summary.png into output_dir (docs/viz.md)
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    step_sampler: StepSamplerConfig = field(default_factory=StepSamplerConfig)
    sweep: EvalSweep = field(default_factory=EvalSweep)

    def __post_init__(self) -> None:
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {self.num_generations}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")
        if self.report and self.output_dir is None:
            raise ValueError("report: true needs an output_dir to write the page and plot to")
        if self.sweep.enabled and self.output_dir is None:
            raise ValueError("sweep needs an output_dir to write the table and plot to")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at 0% and 100%, unlike normal)."""
    if total == 0:
        return (0.0, 0.0)
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def evaluate(
    model: DiffusionModel,
    task: Task,
    sampler_config: SamplerConfig,
    split: str = "test",
    limit: int | None = None,
    num_generations: int = 1,
    batch_size: int = 32,
    output_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    report: bool = False,
    step_sampler: StepSamplerConfig | None = None,
) -> dict[str, Any]:
    """Sample ``num_generations`` completions per row of ``split`` and score them (with
    ``sampler_config``, or ``step_sampler`` for a uniform-noise model).

    Returns the summary; with ``output_dir`` also writes ``generations.jsonl`` and
    ``summary.json`` there, and with ``report`` the first batch's trace page and the summary
    as a PNG (:mod:`unmask.viz.eval_report`). Deterministic for a seed: batch i is sampled
    with seed + i.
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("evaluation needs the model's tokenizer; the model has none")
    if report and output_dir is None:
        raise ValueError("report=True needs an output_dir to write the page and plot to")
    data = task.dataset(split)
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    if len(data) == 0:
        raise ValueError(f"task {task.name!r} split {split!r} has no rows")
    columns = [c for c in data.column_names if c != "prompt"]
    sampler = sampler_for(model, sampler_config, step_sampler)
    model.eval()
    rows_per_batch = max(1, batch_size // num_generations)
    records: list[dict[str, Any]] = []
    nfe = 0
    start = time.perf_counter()
    bar = tqdm(total=len(data), desc=f"eval {task.name}/{split}", disable=not progress)
    for batch_index, first in enumerate(range(0, len(data), rows_per_batch)):
        chunk = data[first : first + rows_per_batch]
        prompts = [p for p in chunk["prompt"] for _ in range(num_generations)]
        batch_columns = {c: [v for v in chunk[c] for _ in range(num_generations)] for c in columns}
        rollout = sampler.generate(model, prompts, seed=seed + batch_index)
        nfe += rollout.nfe
        completions = rollout.completion_texts(tokenizer)
        scores = task.score(prompts, completions, {**batch_columns, **trace_columns(rollout)})
        totals = task.weighted_sum(scores)
        if batch_index == 0:
            first_batch = (rollout, scores, totals)
        for i, completion in enumerate(completions):
            keep = rollout.completion_mask[i]
            rewards = {name: values[i] for name, values in scores.items()}
            records.append(
                {
                    "index": first + i // num_generations,
                    "sample": i % num_generations,
                    "prompt": prompts[i],
                    "completion": completion,
                    "completion_ids": rollout.completion_ids[i][keep].tolist(),
                    "steps": rollout.steps[i][keep].tolist(),
                    "num_steps": int(rollout.num_steps[i]),
                    "rewards": rewards,
                    "reward": totals[i],
                    "correct": rewards.get(task.accuracy_reward) == 1.0,
                }
            )
        bar.update(len(chunk["prompt"]))
        bar.set_postfix(acc=f"{sum(r['correct'] for r in records) / len(records):.3f}")
    bar.close()
    summary = summarise(records, task, num_generations, time.perf_counter() - start)
    summary.update(task=task.name, split=split, batch_nfe=nfe, sampler=vars(sampler.config))
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "generations.jsonl").open("w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if report:
            from unmask.viz.eval_report import write_eval_report

            write_eval_report(out, model, *first_batch, summary, num_generations)
    return summary


def summarise(
    records: Sequence[dict[str, Any]], task: Task, num_generations: int, wall: float
) -> dict[str, Any]:
    """Accuracy with its 95% interval, pass@k, rewards and decoding cost."""
    n = len(records)
    correct = sum(r["correct"] for r in records)
    by_prompt: dict[int, list[bool]] = {}
    for r in records:
        by_prompt.setdefault(r["index"], []).append(r["correct"])
    low, high = wilson_interval(correct, n)
    steps = sum(r["num_steps"] for r in records)
    tokens = sum(len(r["completion_ids"]) for r in records)
    rewards = [r["reward"] for r in records if r["reward"] is not None]
    summary: dict[str, Any] = {
        "num_prompts": len(by_prompt),
        "num_samples": n,
        "accuracy": correct / n,
        "accuracy_ci95": [low, high],
        "reward": sum(rewards) / len(rewards) if rewards else None,
        "reward_unscored": n - len(rewards),
        "mean_nfe": steps / n,
        "tokens_per_step": tokens / max(steps, 1),
        "mean_completion_length": tokens / n,
        "wall_s": wall,
        "samples_per_s": n / wall if wall > 0 else None,
    }
    for name in task.reward_names:
        values = [r["rewards"][name] for r in records]
        scored = [reward_total(v) for v in values if v is not None]
        summary[f"reward/{name}/mean"] = sum(scored) / len(scored) if scored else None
    if num_generations > 1:
        summary[f"pass@{num_generations}"] = sum(
            pass_at_k(len(v), sum(v), num_generations) for v in by_prompt.values()
        ) / len(by_prompt)
        summary["pass@1"] = sum(pass_at_k(len(v), sum(v), 1) for v in by_prompt.values()) / len(
            by_prompt
        )
    return summary


def run_eval(config: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Load the model and task named in ``config`` and evaluate."""
    model, task = _load(config)
    return _evaluate(model, task, config, config.sampler, config.output_dir, progress)


def run_eval_sweep(config: EvalConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate once per ``config.sweep`` setting; one row per setting (:mod:`.sweep`)."""
    if not config.sweep.enabled:
        raise ValueError("sweep: give sweep.steps_per_block and/or sweep.threshold values")
    assert config.output_dir is not None  # EvalConfig checks it
    model, task = _load(config)
    if model.noise != "mask":
        raise ValueError("sweep varies the masked sampler's steps and thresholds: a mask model")

    def one(sampler: SamplerConfig, folder: Path) -> dict[str, Any]:
        return _evaluate(model, task, config, sampler, folder, progress)

    return run_sweep(config.sweep, config.sampler, one, config.output_dir)


def _load(config: EvalConfig) -> tuple[DiffusionModel, Task]:
    from unmask.tasks.registry import get_task

    torch.manual_seed(config.seed)
    model = load_model(config.model, dtype=config.dtype, device=config.device)
    options = dict(config.task_options)
    if options.get("template") == "chat":
        options.setdefault("tokenizer", model.tokenizer)
    return model, get_task(config.task, **options)


def _evaluate(
    model: DiffusionModel,
    task: Task,
    config: EvalConfig,
    sampler: SamplerConfig,
    output_dir: str | Path | None,
    progress: bool,
) -> dict[str, Any]:
    return evaluate(
        model,
        task,
        sampler,
        split=config.split,
        limit=config.limit,
        num_generations=config.num_generations,
        batch_size=config.batch_size,
        output_dir=output_dir,
        seed=config.seed,
        progress=progress,
        report=config.report,
        step_sampler=config.step_sampler,
    )
