"""Process rewards: a reward function may score each completion token, not just the completion.

A task's reward function returns, per completion, a number or a vector with one number per
completion token (``completion_ids[i]``, the scored tokens with the EOS; the trainer passes
them, and the trace as ``completion_steps``, as keyword columns). A per-step reward is a
vector too: put the step's reward on each token the step unmasked (``completion_steps``).

* With TraceRL's value model the weighted vectors are the token rewards ``r_j`` of its GAE
  (docs/value.md), and only the scalar rewards form the outcome.
* Everywhere else (group advantages, metrics, evaluation) a vector counts as the **sum** of its
  entries: the completion's total process reward (:func:`unmask.tasks.base.reward_total`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from unmask.sampling.rollout import Rollout

logger = logging.getLogger(__name__)


def is_vector(value: Any) -> bool:
    """A per-token (process) reward: a list, tuple or 1-D array rather than one number."""
    return isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) == 1


def trace_columns(rollout: Rollout) -> dict[str, list[list[int]]]:
    """``completion_ids`` (the scored tokens, EOS included) and ``completion_steps`` (the step
    that unmasked each), passed to reward functions so a per-token reward can be aligned."""
    ids, steps = [], []
    for row, keep, trace in zip(rollout.completion_ids, rollout.completion_mask.bool(),
                                rollout.steps, strict=True):  # fmt: skip
        ids.append(row[keep].tolist())
        steps.append(trace[keep].tolist())
    return {"completion_ids": ids, "completion_steps": steps}


def check_vectors(scores: Mapping[str, list[Any]], lengths: Sequence[int]) -> dict[str, list[Any]]:
    """``scores`` with every malformed vector (wrong length, a non-finite entry) replaced by
    None, with a warning, so its completion is left out like any unscored one."""
    checked: dict[str, list[Any]] = {}
    for name, values in scores.items():
        out = list(values)
        for i, value in enumerate(values):
            if not is_vector(value):
                continue
            entries = [float(v) for v in value]
            if len(entries) != lengths[i] or not all(math.isfinite(v) for v in entries):
                logger.warning(
                    "reward %s: completion %d needs %d finite per-token values, got %d; "
                    "left out", name, i, lengths[i], len(entries),
                )  # fmt: skip
                out[i] = None
            else:
                out[i] = entries
        checked[name] = out
    return checked


def split_rewards(
    scores: Mapping[str, list[Any]],
    names: Sequence[str],
    weights: Sequence[float],
    completion_mask: torch.Tensor,
) -> tuple[list[float | None], torch.Tensor | None]:
    """The weighted sum of the scalar rewards per completion (the outcome) and of the vector
    ones per completion token ``[B, G]`` (None when no reward gave a vector).

    A completion that only vector rewards scored has outcome 0; one that nothing scored, None.
    """
    mask = completion_mask.bool().cpu()
    outcome: list[float | None] = []
    process = torch.zeros(mask.shape)
    any_vector = False
    for i in range(mask.shape[0]):
        total, seen = 0.0, False
        for name, weight in zip(names, weights, strict=True):
            value = scores[name][i]
            if value is None:
                continue
            seen = True
            if is_vector(value):
                process[i, mask[i]] += weight * torch.as_tensor(list(value), dtype=torch.float32)
                any_vector = True
            else:
                total += weight * float(value)
        outcome.append(total if seen else None)
    return outcome, process if any_vector else None
