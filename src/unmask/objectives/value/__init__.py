"""TraceRL's diffusion value model: a value per token in the state it is unmasked from.

:class:`ValueModel` (the policy's backbone with a zero-initialised scalar head),
:mod:`.returns` (token rewards, returns and GAE over trace steps, the clipped value loss) and
:class:`ValueLearner` (the value model's part of an RL step). See docs/value.md.
"""

from __future__ import annotations

from unmask.objectives.value.learner import (
    ValueConfig,
    ValueLearner,
    load_token_reward,
    scored_values,
    token_reward_vectors,
)
from unmask.objectives.value.model import ValueModel
from unmask.objectives.value.returns import (
    explained_variance,
    gae,
    step_ranks,
    token_returns,
    token_rewards,
    value_loss,
    whiten,
)

__all__ = [
    "ValueConfig",
    "ValueLearner",
    "ValueModel",
    "explained_variance",
    "gae",
    "load_token_reward",
    "scored_values",
    "step_ranks",
    "token_returns",
    "token_reward_vectors",
    "token_rewards",
    "value_loss",
    "whiten",
]
