"""TraceRL's diffusion value model: a value per token in the state it is unmasked from.

:class:`ValueModel` (the policy's backbone with a zero-initialised scalar head),
:mod:`.returns` (token rewards, returns and GAE over trace steps, the clipped value loss) and
:mod:`.config` (its settings, per-token rewards). The learner that trains it is
:class:`unmask.train.value_learner.ValueLearner`. See docs/value.md.
"""

from __future__ import annotations

from unmask.objectives.value.config import (
    TokenReward,
    ValueConfig,
    load_token_reward,
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
    "TokenReward",
    "ValueConfig",
    "ValueModel",
    "explained_variance",
    "gae",
    "load_token_reward",
    "step_ranks",
    "token_returns",
    "token_reward_vectors",
    "token_rewards",
    "value_loss",
    "whiten",
]
