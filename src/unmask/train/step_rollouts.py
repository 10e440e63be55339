"""How ``unmask rl`` samples and updates a uniform-noise model (DiffusionGemma).

Chosen once at trainer start from the model's ``noise`` capability
(:func:`rollout_kind`): a mask predictor keeps the trainer's own sampler and view objectives;
a uniform-noise model gets :class:`StepRollouts`, which samples with
:class:`~unmask.sampling.step_sampler.StepSampler` (per-step traces) and optimises the
per-step objectives (:mod:`unmask.objectives.step_objectives`) with
:func:`~unmask.objectives.step_loss.backward_step_loss`. Rewards, advantages, KL, metrics,
evaluation and checkpoints stay the trainer's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from unmask.models.diffusion_gemma import DiffusionGemma
from unmask.objectives.loss import ClipConfig
from unmask.objectives.step_loss import backward_step_loss
from unmask.objectives.step_objectives import StepObjective, get_step_objective
from unmask.objectives.step_replay import StepViews, step_normalizers
from unmask.sampling.step_sampler import StepSampler
from unmask.sampling.step_trace import StepRollout

if TYPE_CHECKING:
    from unmask.train.rl import RLConfig, RLTrainer


def rollout_kind(config: RLConfig, model: Any, num_processes: int) -> StepRollouts | None:
    """:class:`StepRollouts` for a uniform-noise model, None for a mask predictor."""
    if getattr(model, "noise", "mask") != "uniform":
        return None
    return StepRollouts(config, num_processes)


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
        self.loss_type = config.loss_type or self.objective.loss_type
        level = config.importance_sampling_level or self.objective.importance_sampling_level
        self.clip = ClipConfig(config.epsilon, config.epsilon_high, config.beta, level)
        self.sampler = StepSampler(replace(config.step_sampler, seed=None))

    def sample(self, model: DiffusionGemma, prompts: list[str], seed: int) -> StepRollout:
        return self.sampler.generate(model, prompts, seed=seed)

    def optimize(
        self, trainer: RLTrainer, rollout: StepRollout, advantages: torch.Tensor,
        kept: torch.Tensor,
    ) -> dict[str, float]:  # fmt: skip
        """The trainer's ``_optimize`` for step traces: same guard, clipping and metrics."""
        cfg, acc = trainer.config, trainer.accelerator
        rollout = rollout.to(acc.device)
        kept = kept.to(acc.device)
        divisors = step_normalizers(rollout, self.loss_type, kept)
        views = [
            _kept(self.objective.views(rollout, trainer.generator), kept)
            for _ in range(cfg.num_iterations)
        ]
        per_batch = _rollouts_per_batch(views[0], rollout.batch_size, cfg.micro_batch_size)
        trainer.core.train()
        totals: dict[str, float] = {}
        for it, view in enumerate(views):
            with acc.autocast():
                out = backward_step_loss(
                    trainer.core, rollout, view, advantages, divisors, trainer.reference,
                    rollouts_per_batch=per_batch, clip=self.clip,
                )  # fmt: skip
            grad_norm = trainer.parallel.clip_grad_norm(trainer.model, cfg.max_grad_norm)
            if trainer.guard.skip(out["loss"], float(grad_norm), trainer.steps_done + 1):
                totals["skipped_updates"] = totals.get("skipped_updates", 0.0) + 1
            else:
                trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            if it == 0:
                totals.update(out, grad_norm=float(grad_norm))
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
