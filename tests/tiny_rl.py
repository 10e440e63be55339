"""What the trainer tests share: a toy reward, its task, a tiny run's config, its metrics, and
the checks that a resumed run equals an uninterrupted one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unmask.metrics import read_metrics
from unmask.sampling import SamplerConfig
from unmask.tasks.registry import get_task
from unmask.train.rl_config import RLConfig

__all__ = ["assert_same_weights", "read_metrics", "rl_config", "sevens_task", "untimed"]


def sevens(prompts, completions, **_):
    """Toy reward: the fraction of '7' characters (an untrained policy gets about 1%)."""
    return [c.count("7") / max(len(c), 1) for c in completions]


def sevens_task(*extra):
    """Sudoku prompts scored by ``sevens`` (and ``extra``, weight 1 each); the accuracy reward
    stays, at weight 0, so evaluation still reports it."""
    solved = get_task("sudoku").reward_funcs[1]
    funcs = [sevens, *extra, solved]
    return get_task("sudoku", reward_funcs=funcs, reward_weights=[1.0] * (len(funcs) - 1) + [0.0])


def rl_config(tmp_path: Path, name: str = "run", **changes: Any) -> RLConfig:
    """A seconds-long run of ``nano-block`` in ``tmp_path / name``; ``changes`` override."""
    base = {
        "model": "nano-block",
        "output_dir": str(tmp_path / name),
        "num_prompts": 2,
        "num_generations": 4,
        "max_steps": 4,
        "lr": 3e-3,
        "sampler": SamplerConfig(gen_length=8, temperature=1.0),
        "progress": False,
    }
    return RLConfig(**{**base, **changes})


def untimed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics lines without the wall-clock ones (``*_s``: seconds, tokens per second)."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every tensor of ``a``'s state dict exactly equals ``b``'s, in order."""
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
