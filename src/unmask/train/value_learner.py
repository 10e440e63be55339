"""The value model's part of an RL step: values before the update, token advantages, its update.

In the trainer's process, each step: TraceRL views of the rollouts that are trained on -> the
pre-update value of every trained token in the state it is scored in -> token rewards ->
returns and GAE over trace steps (:mod:`unmask.objectives.value.returns`) -> every
``train_every`` steps, ``iterations`` optimizer updates of the clipped value loss, taken by the
trainers' own :class:`~unmask.train.update.Updater` (micro-batches, spare passes, clipping and
non-finite skips decided over all processes, as for the policy). The policy is then trained on
the token advantages, which came from the value model before its update.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from unmask.integrity import CheckpointError
from unmask.objectives.base import ViewBatch
from unmask.objectives.loss import global_normalizers
from unmask.objectives.tracerl import TraceRL
from unmask.objectives.value import (
    ValueConfig,
    ValueModel,
    explained_variance,
    gae,
    step_ranks,
    token_returns,
    token_rewards,
    value_loss,
    whiten,
)
from unmask.sampling.rollout import Rollout
from unmask.train.checkpoint import load_sharded, save_sharded
from unmask.train.update import Update, Updater

VALUE_STATE = "value_model"  # a DCP folder: the weights and the optimizer state, as sharded


class ValueLearner:
    """Advantages from, and updates of, one value model.

    ``core`` is the unwrapped :class:`ValueModel`; ``updater`` takes its optimizer updates and
    holds the module to call for gradients (``updater.model``: ``core`` prepared by the
    accelerator, or under FSDP2 ``core`` itself, sharded as the policy is), its optimizer and
    its :class:`~unmask.train.distributed.Parallel`. ``shrink`` trace steps are merged per
    value state.
    """

    def __init__(
        self,
        config: ValueConfig,
        core: ValueModel,
        updater: Updater,
        shrink: int,
        micro_batch_size: int,
    ) -> None:
        self.config, self.core, self.updater = config, core, updater
        self.model: nn.Module = updater.model
        self.optimizer: torch.optim.Optimizer = updater.optimizer
        self.accelerator: Accelerator = updater.accelerator
        self.parallel = updater.parallel
        self.trace = TraceRL(shrink=shrink, two_stream=core.layout == "block")
        self.micro_batch_size = micro_batch_size

    def views(self, rollout: Rollout) -> ViewBatch:
        """TraceRL views: every completion token scored once, in the state it was unmasked from."""
        return self.trace.views(rollout.to(self.accelerator.device))

    def step(
        self,
        views: ViewBatch,
        rollout: Rollout,
        outcome: torch.Tensor | None,
        process: torch.Tensor | None,
        kept: torch.Tensor,
        train: bool,
        rl_step: int = 0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Token advantages ``[B, G]`` of the rollouts ``views`` score (0 elsewhere) from the
        pre-update values, the value update when ``train`` (at trainer step ``rl_step``, for
        its warnings), and metrics.

        Returns do not depend on the values, so when training, the first pass of the update
        gives the pre-update values (no separate forward)."""
        cfg, device = self.config, self.accelerator.device
        rollout, views = rollout.to(device), views.to(device)
        ranks = step_ranks(views, rollout.steps)
        trained = ranks >= 0
        rewards = token_rewards(
            ranks,
            None if outcome is None else outcome.to(device),
            None if process is None else process.to(device),
        )
        # A process may keep no rollout this step: its advantages are 0, and its update only
        # joins the others' collectives.
        anything, zeros = bool(trained.any()), torch.zeros_like(rewards)
        returns = token_returns(rewards, ranks, cfg.gamma) if anything else zeros
        metrics: dict[str, float] = {}
        if train:
            divisors = global_normalizers(self.accelerator, rollout, "dapo", kept.to(device))
            spare = self._spare(rollout)
            old, metrics = self.update(views, views.per_token(returns), divisors, spare, rl_step)
        else:
            old = self.values(views, self._spare(rollout))
        values = _to_completion(views, old, ranks.shape)
        advantages = gae(values, rewards, ranks, cfg.gamma, cfg.lam) if anything else zeros
        if cfg.whiten:
            advantages = whiten(advantages, trained)
        metrics.update(
            value_mean=_masked_mean(values, trained),
            value_return_mean=_masked_mean(returns, trained),
            value_explained_var=explained_variance(values, returns, trained),
            advantage_mean=_masked_mean(advantages, trained),
            advantage_std=float(advantages[trained].std()) if trained.sum() > 1 else 0.0,
        )
        return advantages, metrics

    @torch.no_grad()
    def values(self, views: ViewBatch, spare: ViewBatch | None = None) -> torch.Tensor:
        """Values of the scored tokens ``[N, W]`` (0 elsewhere), without gradients. Under FSDP2
        every forward is a collective: with ``spare`` (a view, never empty), as many more
        forwards of it, discarded, as the busiest process runs more micro-batches."""
        self.core.eval()
        size, parallel = self.micro_batch_size, self.parallel
        sharded = spare is not None and parallel.sharded
        extra = parallel.spare_passes(-(-len(views) // size)) if sharded else 0
        out = []
        with self.accelerator.autocast():
            for start in range(0, len(views), size):
                chunk = views.select(slice(start, start + size))
                out.append(scored_values(self.core, self.core, chunk))
            for _ in range(extra):
                scored_values(self.core, self.core, spare)
        return torch.cat(out) if out else torch.zeros(views.scored.shape, device=self.core.device)

    def _spare(self, rollout: Rollout) -> ViewBatch:
        """One view of ``rollout`` for zero-weight passes (never empty, unlike trained views),
        built from its first rollout only: it is needed every step, its content never."""
        return self.views(rollout.select(slice(0, 1))).select(slice(0, 1))

    def update(
        self,
        views: ViewBatch,
        returns: torch.Tensor,
        divisors: torch.Tensor,
        spare: ViewBatch,
        rl_step: int = 0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``iterations`` optimizer updates of the clipped value loss towards ``returns``
        ``[N, W]``, over micro-batches of ``views`` (``spare`` feeds zero-weight passes).
        Returns the pre-update values ``[N, W]`` (from the first pass, which is unclipped: it
        starts there) and metrics; the first pass's loss is reported."""
        self.core.train()
        metrics: dict[str, float] = {}
        clips: list[float] = []
        skipped = 0
        old = torch.zeros(views.scored.shape, device=returns.device)
        for it in range(self.config.iterations):
            firsts: list[torch.Tensor] = []
            update = self._pass(views, returns, divisors, old if it else firsts, spare, rl_step,
                                clips)  # fmt: skip
            if it == 0:
                old = torch.cat(firsts) if firsts else old
                metrics.update(value_loss=update.loss, value_grad_norm=update.grad_norm)
            skipped += update.skipped
        metrics["value_clip_ratio"] = sum(clips) / max(len(clips), 1)
        if skipped:
            metrics["value_skipped_updates"] = float(skipped)
        return old, metrics

    def _pass(
        self,
        views: ViewBatch,
        returns: torch.Tensor,
        divisors: torch.Tensor,
        before: torch.Tensor | list[torch.Tensor],
        spare: ViewBatch,
        rl_step: int,
        clips: list[float],
    ) -> Update:
        """One optimizer update. ``before``: the pre-update values ``[N, W]`` the loss clips
        around, or, on the first pass, a list the micro-batches' predictions are put in (the
        first pass starts at the pre-update values, so it is unclipped)."""
        size = self.micro_batch_size

        def loss(rows: slice) -> torch.Tensor:
            chunk = views.select(rows)
            predicted = scored_values(self.model, self.core, chunk)
            if isinstance(before, list):
                before.append(predicted.detach())
            start = before[-1] if isinstance(before, list) else before[rows]
            out = value_loss(predicted, start, returns[rows], chunk.scored, chunk.rollout_index,
                             divisors, self.config.epsilon)  # fmt: skip
            clips.append(float(out.metrics["value_clip_ratio"]))
            return out.loss

        def spare_pass() -> torch.Tensor:
            return scored_values(self.model, self.core, spare).sum()

        chunks = [slice(start, start + size) for start in range(0, len(views), size)]
        return self.updater(chunks, loss, spare_pass, rl_step)

    # -- checkpoints: a folder next to the policy's files, listed in the same manifest -------
    def save_state(self, folder: Path) -> None:
        """Write the value model's weights and optimizer state into a checkpoint folder, as
        they are sharded (every process; nothing gathered): resumable on any number of
        processes, as the policy's optimizer state."""
        save_sharded(self.model, self.optimizer, folder / VALUE_STATE, weights=True)

    def load_state(self, folder: Path) -> None:
        """Restore what :meth:`save_state` wrote (every process); a clear error when the folder
        has none."""
        if not (folder / VALUE_STATE).is_dir():
            raise CheckpointError(
                f"checkpoint {folder} has no {VALUE_STATE}/: it was written without a value "
                "model (value_model.enabled was false)"
            )
        load_sharded(self.model, self.optimizer, folder / VALUE_STATE, weights=True)


def scored_values(
    model: Callable[..., torch.Tensor], core: ValueModel, views: ViewBatch
) -> torch.Tensor:
    """Values ``[N, W]`` of the scored tokens of ``views``, read where their logits are; 0
    elsewhere. ``model`` is called (the prepared module), ``core`` gives the layout."""
    device = core.device
    views = views.to(device)
    view = views.forward_view(core)  # type: ignore[arg-type]
    values = model(view.input_ids, view.position_ids, view.bias)
    rows, cols = views.scored.nonzero(as_tuple=True)
    picked = values[view.cells(rows, cols)]
    return torch.zeros(views.scored.shape, device=device).index_put((rows, cols), picked)


def _to_completion(views: ViewBatch, per_view: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``[B, G]`` from ``[N, W]`` view values (the inverse of :meth:`ViewBatch.per_token`)."""
    n, c = views.scored.nonzero(as_tuple=True)
    out = torch.zeros(shape, device=per_view.device)
    out[views.rollout_index[n], views.completion_index[n, c]] = per_view[n, c]
    return out


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float(values[mask].mean()) if mask.any() else 0.0
