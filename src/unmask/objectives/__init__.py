"""RL objectives: each one a view builder plus its weighting over the shared clipped loss.

``get_objective(name, **options)`` builds one by name; see docs/objectives.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from unmask.objectives.advantages import SCALE_REWARDS, GroupAdvantages, group_advantages
from unmask.objectives.agrpo import AGRPO
from unmask.objectives.base import (
    Capabilities,
    Objective,
    ViewBatch,
    build,
    check_options_in,
    token_logprobs,
)
from unmask.objectives.coupled import Coupled
from unmask.objectives.diffu_grpo import DiffuGRPO
from unmask.objectives.elbo import ELBO
from unmask.objectives.loss import (
    LOSS_TYPES,
    ClipConfig,
    LossInputs,
    LossOutput,
    normalizers,
    policy_loss,
)
from unmask.objectives.random_mask import RandomMask
from unmask.objectives.replay import Replay, replay
from unmask.objectives.spg import SPG
from unmask.objectives.step_loss import backward_step_loss
from unmask.objectives.step_objectives import STEP_OBJECTIVES, StepObjective, get_step_objective
from unmask.objectives.step_replay import StepViews, step_logprobs, step_normalizers
from unmask.objectives.tracerl import TraceRL
from unmask.objectives.wd1 import WD1

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (TraceRL, AGRPO, DiffuGRPO, Coupled, RandomMask, ELBO, SPG, WD1)
}


def get_objective(name: str, **options: Any) -> Objective:
    """The objective called ``name``, with its options (clear errors for unknown ones)."""
    return build(OBJECTIVES, name, options, "objective")


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Refuse an unknown objective or option (``ValueError`` naming the known ones) without
    building anything, so a config is checked before any model loads. An option is valid when
    the masked or the per-step objective of that name takes it: the model kind is not known yet.
    """
    check_options_in((OBJECTIVES, STEP_OBJECTIVES), name, options)


__all__ = [
    "AGRPO",
    "ELBO",
    "LOSS_TYPES",
    "OBJECTIVES",
    "SCALE_REWARDS",
    "SPG",
    "STEP_OBJECTIVES",
    "WD1",
    "Capabilities",
    "ClipConfig",
    "Coupled",
    "DiffuGRPO",
    "GroupAdvantages",
    "LossInputs",
    "LossOutput",
    "Objective",
    "RandomMask",
    "Replay",
    "StepObjective",
    "StepViews",
    "TraceRL",
    "ViewBatch",
    "backward_step_loss",
    "check_options",
    "get_objective",
    "get_step_objective",
    "group_advantages",
    "normalizers",
    "policy_loss",
    "replay",
    "step_logprobs",
    "step_normalizers",
    "token_logprobs",
]
