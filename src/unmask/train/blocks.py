"""The block size a trainer trains and samples at, settled once at trainer start.

Three settings can name it: the config's ``block_size``, the sampler's ``block_length`` and
the model's own ``settings.block_size``. A trainer reconciles them here and nowhere else: the
model is adapted to the training block (its rows, default decoding block and saved settings
follow it), and the rollout sampler's config gets an explicit ``block_length``. Everything
downstream reads one of those two.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from unmask.models.diffusion_lm import DiffusionLM
from unmask.sampling.sampler import SamplerConfig

logger = logging.getLogger(__name__)


def adapt_block_size(model: DiffusionLM, block_size: int | None) -> None:
    """Train ``model`` at ``block_size`` (None keeps the native one): block-size adaptation,
    after which the model is a block-``block_size`` model (docs/rl.md)."""
    if block_size is None or block_size == model.block_size:
        return
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1 or null, got {block_size}")
    logger.info("block-size adaptation: %s block %d -> %d", model.layout, model.block_size,
                block_size)  # fmt: skip
    model.set_block_size(block_size)


def settle_rollout_block(
    model: DiffusionLM, block_size: int | None, sampler: SamplerConfig
) -> SamplerConfig:
    """Adapt ``model`` to the RL training block and return ``sampler`` with its block length.

    A block model samples and trains at one block (its rollouts' attention block is the one
    the replay uses, so the saved model must say so): ``sampler.block_length`` adapts it as
    ``block_size`` does, and the two must agree. For a full-attention model the sampler's
    block is a decoding choice only; it defaults to the (adapted) model's."""
    sampled = sampler.block_length
    if model.layout == "block" and sampled is not None:
        if block_size is not None and block_size != sampled:
            raise ValueError(
                f"sampler.block_length ({sampled}) and block_size ({block_size}) differ: a "
                "block model samples and trains at one block size"
            )
        block_size = sampled
    adapt_block_size(model, block_size)
    return replace(sampler, block_length=sampled or model.block_size)
