"""Trainers (SFT, RL) and what they share: atomic checkpoints and metrics.

Names are imported lazily, so ``import unmask.train.checkpoint`` does not load the trainers
(and accelerate) with it.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "SFTConfig": "unmask.train.sft",
    "SFTTrainer": "unmask.train.sft",
    "encode_pairs": "unmask.train.sft",
    "train_sft": "unmask.train.sft",
    "RLConfig": "unmask.train.rl_config",
    "RLTrainer": "unmask.train.rl",
    "train_rl": "unmask.train.rl",
    "CheckpointError": "unmask.train.checkpoint",
    "latest_checkpoint": "unmask.train.checkpoint",
    "load_checkpoint": "unmask.train.checkpoint",
    "save_checkpoint": "unmask.train.checkpoint",
    "save_model": "unmask.models.saving",
    "MetricsWriter": "unmask.metrics",
    "read_metrics": "unmask.metrics",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unmask.train' has no attribute {name!r}")
