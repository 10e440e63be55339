"""How ``unmask rl`` samples and updates a mask predictor: its objective's views, optimised.

Chosen at trainer start for a model whose noise is the mask token (a uniform-noise model gets
:class:`~unmask.train.step_rollouts.StepRollouts`). Here the block length, the objective and
its settings are settled once, and each step's optimisation runs: the objective's views of the
rollout batch (one set per pass), the old log-probs (the sampler's, or the pre-update model's)
and the reference model's, then ``num_iterations`` passes, each one optimizer update over
micro-batches of the clipped policy loss (:mod:`unmask.train.update`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from unmask.models.diffusion_lm import DiffusionLM
from unmask.objectives import (
    OBJECTIVES,
    Objective,
    ViewBatch,
    get_objective,
    policy_loss,
    token_logprobs,
)
from unmask.objectives.grouped import grouped_views
from unmask.objectives.loss import ClipConfig, LossInputs, global_normalizers
from unmask.sampling.rollout import Rollout
from unmask.sampling.sampler import Sampler
from unmask.train.blocks import settle_rollout_block
from unmask.train.global_batch import StepGroups
from unmask.train.rl_config import RLConfig, objective_settings
from unmask.train.update import Update

if TYPE_CHECKING:
    from unmask.train.rl import RLTrainer


class ViewUpdates:
    """Sampling with the project's sampler and updates through the objective's views.

    The sampler's config carries the resolved block length (:mod:`unmask.train.blocks`); a
    block model scores every block's step in one packed ``[clean | noisy]`` row when the
    objective can (``two_stream``, unless the options say otherwise).
    """

    def __init__(self, config: RLConfig, model: DiffusionLM) -> None:
        sampler = settle_rollout_block(model, config.block_size, config.sampler)
        options = dict(config.objective_options)
        if OBJECTIVES[config.objective].supports_two_stream:
            options.setdefault("two_stream", model.layout == "block")
        self.objective: Objective = get_objective(config.objective, **options)
        self.settings = settings = objective_settings(config, type(self.objective))
        level = settings.importance_sampling_level
        self.clip = ClipConfig(config.epsilon, config.epsilon_high, config.beta, level)
        needs_logprobs = self.objective.old_logprobs == "sampler"
        self.sampler = Sampler(replace(sampler, return_logprobs=needs_logprobs, seed=None))

    def sample(
        self, sampler: Sampler, model: DiffusionLM, prompts: list[str], groups: StepGroups
    ) -> Rollout:
        """The step's rollouts of this process, each group from its own stream."""
        return sampler.generate(model, prompts, group_seeds=groups.seeds("sample"))

    def optimize(
        self, trainer: RLTrainer, rollout: Rollout, advantages: torch.Tensor, kept: torch.Tensor
    ) -> dict[str, float]:
        """``num_iterations`` optimizer updates; old and reference log-probs are taken first.

        ``advantages`` are per rollout ``[B]`` or per completion token ``[B, G]``. Each pass's
        views are drawn group by group, from the group's stream for that pass."""
        device = trainer.accelerator.device
        rollout = rollout.to(device)
        advantages, kept = advantages.to(device), kept.to(device)
        batch = _Batch(
            advantages,
            rollout.completion_lengths,
            global_normalizers(trainer.accelerator, rollout, self.settings.loss_type, kept),
            self._sampling_kwargs(trainer.config),
        )
        groups = trainer.groups()
        built = [
            grouped_views(self.objective, rollout, groups.generators(f"views/{it}"))
            for it in range(self.settings.num_iterations)
        ]
        views = [trained_views(v, kept) for v in built]
        pairs = list(zip(views, built, strict=True))
        kw = batch.sample_kw
        olds = [self._old_logprobs(trainer, v, b, rollout, kw) for v, b in pairs]
        refs = [self._reference_logprobs(trainer, v, b, kw) for v, b in pairs]
        trainer.core.train()
        means = _Means()
        for it, (view, old, ref) in enumerate(zip(views, olds, refs, strict=True)):
            update = self._update(trainer, batch, view, built[it], old, ref, means)
            if update.skipped:
                means.count("skipped_updates")
            if it == 0:
                means.set(loss=update.loss, grad_norm=update.grad_norm)
        trainer.scheduler.step()
        metrics = means.values()
        metrics["clip_ratio"] = metrics.get("clip_ratio/region_mean", 0.0)
        metrics["num_views"] = float(sum(len(v) for v in views))
        return metrics

    def _update(
        self,
        trainer: RLTrainer,
        batch: _Batch,
        views: ViewBatch,
        spare_views: ViewBatch,
        old: torch.Tensor | None,
        ref: torch.Tensor | None,
        means: _Means,
    ) -> Update:
        """One pass: an optimizer update over micro-batches of ``views``. ``spare_views`` (all
        of the pass's views, never empty) feed the zero-weight spare passes."""
        cfg, device = trainer.config, trainer.accelerator.device
        policy = Forward(trainer.model, trainer.core)
        per_token = views.per_token(batch.advantages) if batch.advantages.dim() == 2 else None

        def loss(rows: torch.Tensor) -> torch.Tensor:
            chunk = views.select(rows).to(device)
            logp, entropy = token_logprobs(
                policy, chunk, len(chunk), with_entropy=True, **batch.sample_kw
            )
            advantages = batch.advantages if per_token is None else per_token[rows]
            weights = chunk.weights
            if self.objective.ratio_free:  # its weights may depend on the log-probs
                advantages, weights = self.objective.reweight(
                    chunk, logp.detach(), batch.advantages, batch.lengths, cfg.num_generations
                )
            inputs = LossInputs(
                logp,
                logp.detach() if old is None else old[rows].to(device),
                advantages,
                chunk.scored,
                weights,
                chunk.rollout_index,
                batch.divisors,
                None if ref is None else ref[rows].to(device),
                lengths=batch.lengths,
                entropy=entropy,
            )
            out = policy_loss(inputs, self.clip)
            means.add(out.metrics)
            return out.loss

        def spare() -> torch.Tensor:
            one = spare_views.select(slice(0, 1)).to(device)
            return token_logprobs(policy, one, 1, **batch.sample_kw).sum()

        chunks = micro_batches(views, cfg.micro_batch_size)
        return trainer.updater(chunks, loss, spare, trainer.steps_done + 1)

    def _sampling_kwargs(self, config: RLConfig) -> dict[str, Any]:
        if not self.objective.scores_sampling_distribution:
            return {}
        s = config.sampler
        return {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p}

    @torch.no_grad()
    def _old_logprobs(
        self,
        trainer: RLTrainer,
        views: ViewBatch,
        spare: ViewBatch,
        rollout: Rollout,
        sample_kw: dict[str, Any],
    ) -> torch.Tensor | None:
        """Log-probs of the policy that sampled: stored by the sampler (AGRPO), recomputed
        with the pre-update model, or None when the first pass is on-policy (``num_iterations``
        1: the ratio is 1, so the current log-probs, detached, serve)."""
        if self.objective.old_logprobs == "sampler":
            return views.per_token(self.objective.sampler_logprobs(rollout))
        if self.settings.num_iterations == 1 or self.objective.ratio_free:
            return None
        trainer.core.eval()
        return _no_grad_logprobs(trainer, trainer.core, views, spare, sample_kw)

    @torch.no_grad()
    def _reference_logprobs(
        self, trainer: RLTrainer, views: ViewBatch, spare: ViewBatch, sample_kw: dict[str, Any]
    ) -> torch.Tensor | None:
        if trainer.reference is None:
            return None
        return _no_grad_logprobs(trainer, trainer.reference, views, spare, sample_kw)


def _no_grad_logprobs(
    trainer: RLTrainer, model: Any, views: ViewBatch, spare: ViewBatch, sample_kw: dict[str, Any]
) -> torch.Tensor:
    """Log-probs of ``views`` (called without gradients); under FSDP2 with as many forwards
    as the busiest process runs (each is a collective, so the count is agreed first; the
    extra ones score a view of ``spare``, the pass's views, never empty)."""
    size, parallel = trainer.config.micro_batch_size, trainer.parallel
    extra = parallel.spare_passes(-(-len(views) // size)) if parallel.sharded else 0
    with trainer.accelerator.autocast():
        out = token_logprobs(model, views, size, **sample_kw)
        for _ in range(extra):
            token_logprobs(model, spare.select(slice(0, 1)), 1, **sample_kw)
    return out


@dataclass
class _Batch:
    """What every pass over one rollout batch shares."""

    advantages: torch.Tensor  # [B] or [B, G]
    lengths: torch.Tensor  # [B] completion lengths
    divisors: torch.Tensor  # the loss normalizers, counted over all processes
    sample_kw: dict[str, Any]  # the distribution tokens are scored under


class _Means:
    """Step metrics averaged over the micro-batches that report them."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            self.totals[key] = self.totals.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + 1

    def count(self, key: str) -> None:
        """One more event ``key`` (reported as a count, not a mean)."""
        self.totals[key] = self.totals.get(key, 0.0) + 1
        self.counts[key] = 1

    def set(self, **values: float) -> None:
        for key, value in values.items():
            self.totals[key], self.counts[key] = value, 1

    def values(self) -> dict[str, float]:
        return {key: self.totals[key] / self.counts[key] for key in self.totals}


class Forward:
    """The prepared (possibly DDP-wrapped) module to call for gradients, with the trained
    model's attributes (layout, settings) that building its inputs reads."""

    def __init__(self, prepared: Callable[..., torch.Tensor], core: DiffusionLM) -> None:
        self._prepared, self._core = prepared, core

    def __call__(self, *args: Any) -> torch.Tensor:
        return self._prepared(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)


def trained_views(views: ViewBatch, kept: torch.Tensor) -> ViewBatch:
    """Only the views of rollouts that are trained on (dropped groups cost no forward)."""
    rows = kept.to(views.rollout_index.device)[views.rollout_index]
    return views if bool(rows.all()) else views.select(rows.nonzero()[:, 0])


def micro_batches(views: ViewBatch, size: int) -> list[torch.Tensor]:
    """Row indices of micro-batches of about ``size`` views, never splitting a rollout's views
    (sequence-level ratios need them together)."""
    order = torch.argsort(views.rollout_index, stable=True)
    ids = views.rollout_index[order]
    chunks: list[torch.Tensor] = []
    begin = 0
    while begin < len(order):
        end = min(begin + size, len(order))
        while end < len(order) and ids[end] == ids[end - 1]:
            end += 1
        chunks.append(order[begin:end])
        begin = end
    return chunks
