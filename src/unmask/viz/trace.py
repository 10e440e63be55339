"""``unmask trace``: sample a group of completions and write the step-by-step trace page.

Prompts come from the config (``prompts``) or from one row of a task split (``task``,
``split``, ``index``), which also scores the completions with the task's rewards. Each prompt
is sampled ``num_generations`` times, so the page shows a GRPO-style group side by side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unmask.sampling.sampler import SamplerConfig

logger = logging.getLogger(__name__)


@dataclass
class TraceConfig:
    """What to sample and where to write the page (see configs/trace_sudoku_tiny.yaml)."""

    model: str = "tiny-block"
    prompts: list[str] = field(default_factory=list)
    task: str | None = None  # take the prompt from a task row instead, and score with its rewards
    task_options: dict[str, Any] = field(default_factory=dict)
    split: str = "test"
    index: int = 0  # the task row traced
    num_generations: int = 4  # samples per prompt, shown side by side
    output: str = "trace.html"
    confidence: bool = True  # replay the trace for per-token confidence (one forward per step)
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self) -> None:
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {self.num_generations}")
        if self.index < 0:
            raise ValueError(f"index must be >= 0, got {self.index}")
        if self.prompts and self.task is not None:
            raise ValueError("give prompts or task, not both")


def run_trace(config: TraceConfig) -> Path:
    """Load the model, sample, score (with a task) and write the page; returns its path."""
    from unmask.models.diffusion_lm import DiffusionLM
    from unmask.sampling.sampler import Sampler
    from unmask.tasks.registry import build_task
    from unmask.viz.trace_html import replay_confidences, write_trace_html

    if not config.prompts and config.task is None:
        raise ValueError("give a prompt (--prompt or prompts:) or a task (task=sudoku)")
    n = config.num_generations
    if n > 1 and config.sampler.temperature == 0:
        logger.warning("greedy sampling (sampler.temperature=0): all %d samples are the same", n)
    model = DiffusionLM.from_pretrained(config.model, dtype=config.dtype, device=config.device)
    model.eval()
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError(f"model {config.model!r} has no tokenizer: the page needs token text")
    columns: dict[str, list[Any]] = {}
    task = None
    if config.task is not None:
        task = build_task(config.task, config.task_options, tokenizer)
        data = task.dataset(config.split)
        if config.index >= len(data):
            raise ValueError(
                f"index: {config.index} is past the last row of {config.task}/{config.split} "
                f"({len(data)} rows)"
            )
        row = data[config.index]
        prompts = [row["prompt"]] * n
        columns = {c: [row[c]] * n for c in data.column_names if c != "prompt"}
        title = f"{config.model}: {config.task}/{config.split} row {config.index}"
    else:
        prompts = [p for p in config.prompts for _ in range(n)]
        title = f"{config.model}: {len(config.prompts)} prompt(s)"
    rollout = Sampler(config.sampler).generate(model, prompts, seed=config.seed)
    totals, parts = None, None
    if task is not None:
        parts = task.score(prompts, rollout.completion_texts(tokenizer), columns)
        totals = task.weighted_sum(parts)
    confidences = replay_confidences(model, rollout) if config.confidence else None
    several = len(prompts) > n
    labels = [f"prompt {i // n}, sample {i % n}" if several else f"sample {i}"
              for i in range(len(prompts))]  # fmt: skip
    return write_trace_html(
        rollout,
        tokenizer,
        config.output,
        rewards=totals,
        reward_parts=parts,
        confidences=confidences,
        labels=labels,
        title=title,
    )
