"""How ``unmask rl`` samples and updates a uniform-noise model (DiffusionGemma).

Chosen once at trainer start from the model's ``noise`` capability: a mask predictor gets
:class:`~unmask.train.view_updates.ViewUpdates`; a uniform-noise model gets
:class:`StepRollouts`, which samples with
:class:`~unmask.sampling.step_sampler.StepSampler` (per-step traces) and optimises the
per-step objectives (:mod:`unmask.objectives.step_objectives`) with
:func:`~unmask.objectives.step_loss.backward_step_loss` (which runs its own micro-batches;
clipping and the skip are the trainer's :class:`~unmask.train.update.Updater`). Rewards,
advantages, KL, metrics, evaluation and checkpoints stay the trainer's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from unmask.objectives.loss import ClipConfig
from unmask.objectives.step_loss import backward_step_loss
from unmask.objectives.step_objectives import StepObjective, get_step_objective
from unmask.objectives.step_replay import StepViews, step_normalizers
from unmask.sampling.step_sampler import StepSampler
from unmask.sampling.step_trace import StepRollout
from unmask.train.global_batch import StepGroups
from unmask.train.rl_config import RLConfig, objective_settings

if TYPE_CHECKING:
    from unmask.train.rl import RLTrainer


class StepRollouts:
    """Sampling and ``num_iterations`` updates on per-step traces.

    Old log-probs are always the sampler's (the replay is exact, docs/objectives.md); a
    micro-batch holds whole rollouts, about ``micro_batch_size`` replayed steps.
    """

    def __init__(self, config: RLConfig, num_processes: int) -> None:
        unsupported = {
            "curriculum": bool(config.curriculum),
            "block_size": config.block_size is not None,
            "value_model": config.value_model.enabled,
            "fsdp": config.fsdp.enabled,
            "several processes": num_processes > 1,
        }
        used = [name for name, on in unsupported.items() if on]
        if used:
            raise ValueError(
                f"a uniform-noise model (DiffusionGemma) does not support {', '.join(used)} "
                "yet (docs/diffusion_gemma.md)"
            )
        self.objective: StepObjective = get_step_objective(
            config.objective, **config.objective_options
        )
        self.settings = settings = objective_settings(config, type(self.objective))
        level = settings.importance_sampling_level
        self.clip = ClipConfig(config.epsilon, config.epsilon_high, config.beta, level)
        self.sampler = StepSampler(replace(config.step_sampler, seed=None))

    def sample(
        self, sampler: StepSampler, model: Any, prompts: list[str], groups: StepGroups
    ) -> StepRollout:
        """The step's rollouts, from one stream for the step (one process only)."""
        return sampler.generate(model, prompts, seed=groups.step_seed("sample"))

    def optimize(
        self, trainer: RLTrainer, rollout: StepRollout, advantages: torch.Tensor,
        kept: torch.Tensor,
    ) -> dict[str, float]:  # fmt: skip
        """``num_iterations`` updates on step traces: same updater, guard and metrics."""
        cfg, acc = trainer.config, trainer.accelerator
        rollout = rollout.to(acc.device)
        kept = kept.to(acc.device)
        divisors = step_normalizers(rollout, self.settings.loss_type, kept)
        groups, views = trainer.groups(), []
        for it in range(self.settings.num_iterations):
            generator = torch.Generator().manual_seed(groups.step_seed(f"views/{it}"))
            views.append(_kept(self.objective.views(rollout, generator), kept))
        per_batch = _rollouts_per_batch(views[0], rollout.batch_size, cfg.micro_batch_size)
        trainer.core.train()
        totals: dict[str, float] = {}
        for it, view in enumerate(views):
            with acc.autocast():
                out = backward_step_loss(
                    trainer.core, rollout, view, advantages, divisors, trainer.reference,
                    rollouts_per_batch=per_batch, clip=self.clip,
                )  # fmt: skip
            update = trainer.updater.apply(out["loss"], trainer.steps_done + 1)
            if update.skipped:
                totals["skipped_updates"] = totals.get("skipped_updates", 0.0) + 1
            if it == 0:
                totals.update(out, grad_norm=update.grad_norm)
        trainer.scheduler.step()
        totals["clip_ratio"] = totals.get("clip_ratio/region_mean", 0.0)
        totals["num_views"] = float(sum(len(v) for v in views))
        return totals


def _kept(views: StepViews, kept: torch.Tensor) -> StepViews:
    """Only the views of rollouts that are trained on (dropped groups cost no forward)."""
    return views.select(kept.to(views.row.device)[views.row].nonzero().flatten())


def _rollouts_per_batch(views: StepViews, rollouts: int, micro_batch_size: int) -> int:
    """Whole rollouts per micro-batch, about ``micro_batch_size`` views in each."""
    per_rollout = max(len(views) / max(rollouts, 1), 1.0)
    return max(1, int(micro_batch_size // per_rollout))
