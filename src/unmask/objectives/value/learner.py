"""The value model's part of an RL step: values before the update, token advantages, its update.

In the trainer's process, each step: TraceRL views of the rollouts that are trained on -> the
pre-update value of every trained token in the state it is scored in -> token rewards ->
returns and GAE over trace steps (:mod:`.returns`) -> every ``train_every`` steps,
``iterations`` optimizer steps of the clipped value loss. The policy is then trained on the
token advantages, which came from the value model before its update.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from accelerate import Accelerator
from torch import nn

from unmask.objectives.base import ViewBatch
from unmask.objectives.loss import global_normalizers
from unmask.objectives.tracerl import TraceRL
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
from unmask.sampling.rollout import Rollout

logger = logging.getLogger(__name__)

VALUE_STATE = "value_model.pt"
VALUE_OPTIMIZER = "value_optimizer.pt"
OUTCOMES: tuple[str, ...] = ("group", "raw", "none")


@dataclass
class ValueConfig:
    """``value_model:`` of ``unmask rl`` (TraceRL's diffusion value model; docs/value.md).

    ``reward``: the outcome reward put on the last step's tokens: ``group`` (the trainer's
    group-normalised advantage, ``scale_rewards``), ``raw`` (the reward as scored) or ``none``
    (only ``token_reward``). ``token_reward``: ``"module:function"`` giving a reward per
    completion token (process reward), added to the outcome. ``shrink``: trace steps merged
    per value state; null is the objective's ``shrink`` (1 for objectives without one).
    ``epsilon``: clip range of the value around its pre-update value (null: unclipped).
    """

    enabled: bool = False
    init: str | None = None  # checkpoint to start from; null: the policy's starting weights
    lr: float = 5e-6
    epsilon: float | None = 0.2
    gamma: float = 1.0
    lam: float = 1.0
    train_every: int = 1
    iterations: int = 1
    whiten: bool = False
    reward: Literal["group", "raw", "none"] = "group"
    token_reward: str | None = None
    shrink: int | None = None

    def __post_init__(self) -> None:
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"value_model.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("train_every", "iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"value_model.{name} must be >= 1, got {getattr(self, name)}")
        if self.shrink is not None and self.shrink < 1:
            raise ValueError(f"value_model.shrink must be >= 1 or null, got {self.shrink}")
        if self.lr < 0:
            raise ValueError(f"value_model.lr must be >= 0, got {self.lr}")
        if self.epsilon is not None and self.epsilon <= 0:
            raise ValueError(f"value_model.epsilon must be > 0 or null, got {self.epsilon}")
        if self.reward not in OUTCOMES:
            raise ValueError(f"value_model.reward must be one of {OUTCOMES}, got {self.reward!r}")
        if self.token_reward is not None and ":" not in self.token_reward:
            raise ValueError(
                f"value_model.token_reward must look like 'module:function', "
                f"got {self.token_reward!r}"
            )


class UpdateOutcome(Protocol):
    """What one update did (:class:`unmask.train.update.Update`)."""

    loss: float
    grad_norm: float
    skipped: bool


class UpdateStep(Protocol):
    """One optimizer update over micro-batches: the trainers' own
    (:class:`unmask.train.update.Updater`), so the value model's updates accumulate, clip,
    pair their collectives (zero-weight ``spare`` passes) and skip non-finite updates over all
    processes exactly as the policy's do."""

    def __call__(
        self,
        batches: Sequence[Any],
        loss: Callable[[Any], torch.Tensor],
        spare: Callable[[], torch.Tensor],
        step: int,
    ) -> UpdateOutcome: ...


class ValueLearner:
    """Advantages from, and updates of, one value model.

    ``model`` is the module to call for gradients (DDP-wrapped by ``accelerator.prepare``),
    ``core`` the unwrapped :class:`ValueModel` it wraps. ``updater`` takes its optimizer
    updates (the RL trainer passes its own machinery); without one, a learner on a single
    process steps ``optimizer`` itself, skipping non-finite updates.
    """

    def __init__(
        self,
        config: ValueConfig,
        model: nn.Module,
        core: ValueModel,
        optimizer: torch.optim.Optimizer,
        accelerator: Accelerator,
        shrink: int,
        micro_batch_size: int,
        max_grad_norm: float | None,
        updater: UpdateStep | None = None,
    ) -> None:
        self.config = config
        self.model, self.core, self.optimizer = model, core, optimizer
        self.accelerator = accelerator
        self.trace = TraceRL(shrink=shrink, two_stream=core.layout == "block")
        self.micro_batch_size = micro_batch_size
        if updater is None:
            updater = _OneProcessUpdate(accelerator, model, optimizer, max_grad_norm)
        self.updater = updater

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
            spare = self.views(rollout).select(slice(0, 1))  # never empty, unlike ``views``
            old, metrics = self.update(views, views.per_token(returns), divisors, spare, rl_step)
        else:
            old = self.values(views)
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
    def values(self, views: ViewBatch) -> torch.Tensor:
        """Values of the scored tokens ``[N, W]`` (0 elsewhere), without gradients."""
        self.core.eval()
        out = []
        with self.accelerator.autocast():
            for start in range(0, len(views), self.micro_batch_size):
                chunk = views.select(slice(start, start + self.micro_batch_size))
                out.append(scored_values(self.core, self.core, chunk))
        return torch.cat(out) if out else torch.zeros(views.scored.shape, device=self.core.device)

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
    ) -> UpdateOutcome:
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

    # -- checkpoints: files next to the policy's, listed in the same manifest -----------------
    def save_state(self, folder: Path) -> None:
        """Write the value model's weights and optimizer into a checkpoint folder."""
        torch.save(self.core.state_dict(), folder / VALUE_STATE)
        torch.save(self.optimizer.state_dict(), folder / VALUE_OPTIMIZER)

    def load_state(self, folder: Path) -> None:
        """Restore what :meth:`save_state` wrote; a clear error when the folder has none."""
        from unmask.integrity import CheckpointError

        for name in (VALUE_STATE, VALUE_OPTIMIZER):
            if not (folder / name).is_file():
                raise CheckpointError(
                    f"checkpoint {folder} has no {name}: it was written without a value model "
                    "(value_model.enabled was false)"
                )
        self.core.load_state_dict(torch.load(folder / VALUE_STATE, weights_only=True))
        self.optimizer.load_state_dict(torch.load(folder / VALUE_OPTIMIZER, weights_only=True))


@dataclass
class _Outcome:
    loss: float
    grad_norm: float
    skipped: bool


class _OneProcessUpdate:
    """The updates of a learner used on its own (one process, no trainer): accumulate over the
    micro-batches, clip, and skip a non-finite update."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float | None,
    ) -> None:
        if accelerator.num_processes > 1:
            raise ValueError("a ValueLearner on several processes needs the trainer's updater")
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.max_grad_norm = max_grad_norm

    def __call__(
        self,
        batches: Sequence[Any],
        loss: Callable[[Any], torch.Tensor],
        spare: Callable[[], torch.Tensor],
        step: int,
    ) -> _Outcome:
        acc, total = self.accelerator, 0.0
        for batch in batches:
            with acc.autocast():
                out = loss(batch)
                acc.backward(out)
            total += float(out.detach())
        norm = float(acc.clip_grad_norm_(self.model.parameters(),
                                         self.max_grad_norm or float("inf")))  # fmt: skip
        skipped = not (math.isfinite(total) and math.isfinite(norm))
        if skipped:
            logger.warning("value update skipped: non-finite loss (%s) or gradient norm (%s)",
                           total, norm)  # fmt: skip
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _Outcome(total, norm, skipped)


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


# -- per-token (process) rewards -------------------------------------------------------------
TokenReward = Callable[..., Sequence[Sequence[float] | None]]


def load_token_reward(spec: str) -> TokenReward:
    """The function ``"module:function"`` names (``value_model.token_reward``)."""
    module, _, name = spec.partition(":")
    try:
        func = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"value_model.token_reward: cannot import {spec!r} ({err})") from err
    if not callable(func):
        raise ValueError(f"value_model.token_reward: {spec!r} is not callable")
    return func


def token_reward_vectors(
    func: TokenReward,
    prompts: Sequence[str],
    completions: Sequence[str],
    rollout: Rollout,
    columns: Mapping[str, list[Any]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``[B, G]`` and which rollouts got them ``[B]``.

    ``func(prompts, completions, completion_ids=..., **columns)`` returns, per completion, one
    number per completion token (``completion_ids[i]``: the scored ids, EOS included) or None.
    Like the task's rewards it never stops training: an exception, a wrong length or a
    non-finite number leaves the rollout unscored (out of the loss) with a warning.
    """
    masks = rollout.completion_mask.bool().cpu()
    ids = [row[m].tolist() for row, m in zip(rollout.completion_ids.cpu(), masks, strict=True)]
    name = getattr(func, "__name__", repr(func))
    try:
        values = list(func(list(prompts), list(completions), completion_ids=ids, **columns))
        if len(values) != len(ids):
            raise ValueError(f"{len(values)} vectors for {len(ids)} completions")
    except Exception:  # reward code never kills training
        logger.warning("token reward %s failed; its rollouts are left out", name, exc_info=True)
        values = [None] * len(ids)
    out = torch.zeros(masks.shape)
    ok = torch.zeros(len(ids), dtype=torch.bool)
    for i, (vector, mask) in enumerate(zip(values, masks, strict=True)):
        if vector is None:
            continue
        row = torch.as_tensor(list(vector), dtype=torch.float32)
        if row.shape != (int(mask.sum()),) or not torch.isfinite(row).all():
            logger.warning(
                "token reward %s: completion %d needs %d finite values, got %d; left out",
                name, i, int(mask.sum()), row.numel(),
            )  # fmt: skip
            continue
        out[i, mask] = row
        ok[i] = True
    return out, ok
