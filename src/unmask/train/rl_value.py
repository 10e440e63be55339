"""The value model's part of ``unmask rl`` (TraceRL's diffusion value model, docs/value.md):
its learner, set up next to the policy and sharded as it is; and a step's rewards turned into
token advantages."""

from __future__ import annotations

from typing import Any

import torch

from unmask.models.diffusion_lm import DiffusionLM
from unmask.models.lora import has_lora
from unmask.objectives.value import TokenReward, ValueModel, token_reward_vectors
from unmask.sampling.rollout import Rollout
from unmask.train.common import build_optimizer
from unmask.train.distributed import Parallel
from unmask.train.rl_config import RLConfig
from unmask.train.scoring import Scores
from unmask.train.sharding import FSDPConfig
from unmask.train.update import UpdateGuard, Updater
from unmask.train.value_learner import ValueLearner
from unmask.train.view_updates import trained_views


def value_learner(
    config: RLConfig, policy: DiffusionLM, accelerator: Any, fsdp: FSDPConfig
) -> ValueLearner:
    """The value model (from ``value_model.init``, else a copy of the starting policy's
    backbone, so build it before the policy is sharded) at the policy's block size, with its
    own AdamW at ``value_model.lr``, prepared like the policy (DDP, or sharded by FSDP2 with
    the policy's ``fsdp`` settings) and updated by the same machinery. A skipped value update
    is counted (``value_skipped_updates``) but never stops the run."""
    vcfg = config.value_model
    if vcfg.init is None:
        if has_lora(policy):
            raise ValueError(
                "value_model.init must name the checkpoint to start the value model from "
                "when the policy trains LoRA adapters (it is a full model)"
            )
        core = ValueModel.from_policy(policy)
    else:
        core = ValueModel.from_pretrained(vcfg.init, dtype="float32", device=accelerator.device)
        if (core.layout, core.mask_token_id) != (policy.layout, policy.mask_token_id):
            raise ValueError(
                f"value_model.init {vcfg.init}: layout {core.layout!r} and mask token "
                f"{core.mask_token_id} differ from the policy's ({policy.layout!r}, "
                f"{policy.mask_token_id})"
            )
    core.set_block_size(policy.block_size)  # an adapted policy's value model follows it
    core = core.to(accelerator.device)
    parallel = Parallel(accelerator, fsdp)
    parallel.shard(core)
    optimizer = build_optimizer(core, vcfg.lr, config.weight_decay, config.adam_betas)
    model, optimizer = parallel.prepare(core, optimizer)
    guard = UpdateGuard(accelerator, config.max_bad_steps, "value update")
    updater = Updater(accelerator, parallel, model, optimizer, guard, config.max_grad_norm)
    shrink = vcfg.shrink or int(config.objective_options.get("shrink", 1))
    return ValueLearner(vcfg, core, updater, shrink, config.micro_batch_size)


def token_advantages(
    learner: ValueLearner,
    config: RLConfig,
    token_reward: TokenReward | None,
    rollout: Rollout,
    scores: Scores,
    group_advantages: torch.Tensor,
    kept: torch.Tensor,
    prompts: list[str],
    columns: dict[str, list[Any]],
    step: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Token advantages ``[B, G]`` from the value model (updated every ``train_every`` steps),
    the rollouts still trained on (a failed ``token_reward`` leaves one out), and metrics."""
    vcfg = config.value_model
    outcome = {"group": group_advantages, "raw": scores.rewards, "none": None}[vcfg.reward]
    process = scores.per_token
    if token_reward is not None:
        extra, ok = token_reward_vectors(token_reward, prompts, scores.completions, rollout,
                                         columns)  # fmt: skip
        process = extra if process is None else process + extra
        kept = kept & ok
    if vcfg.reward == "none" and process is None:
        raise ValueError(
            "value_model.reward: none leaves the value model without rewards: set "
            "value_model.token_reward or give the task a reward function that returns one "
            "number per completion token (docs/value.md)"
        )
    views = trained_views(learner.views(rollout), kept)
    train = step % vcfg.train_every == 0
    advantages, metrics = learner.step(views, rollout, outcome, process, kept, train, step)
    return advantages, kept, metrics
