"""One optimizer update over micro-batches: the same machinery for SFT, the RL policy and the
value model, so none of them drifts from the others.

Gradients are summed over the micro-batches with the gradient all-reduce on the last one only
(``no_sync``); a process with fewer micro-batches than another first runs zero-weight spare
passes, so the collectives of every process pair up (:meth:`Parallel.spare_passes`); the
gradient is clipped over all processes; and the update is skipped on every process when the
loss or the gradient norm is not finite on any of them (:class:`UpdateGuard`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from unmask.train.distributed import Parallel, on_any_process

logger = logging.getLogger(__name__)

Batch = TypeVar("Batch")


class UpdateGuard:
    """Skips an optimizer update whose loss or gradient norm is not finite on any process
    (all processes skip together, so replicas stay identical and no NaN reaches the weights),
    and counts such updates in a row: after ``limit`` of them the run is diverging and stops.
    """

    def __init__(self, accelerator: Any, limit: int, what: str = "update") -> None:
        self.accelerator, self.limit, self.what = accelerator, limit, what
        self.in_a_row = 0

    def skip(self, loss: float, grad_norm: float, step: int) -> bool:
        """Whether to skip this update (warns when it does)."""
        bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not on_any_process(self.accelerator, bad):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        logger.warning(
            "step %d: non-finite loss (%s) or gradient norm (%s); %s skipped",
            step, loss, grad_norm, self.what,
        )  # fmt: skip
        return True

    @property
    def failing(self) -> bool:
        """Whether ``limit`` updates in a row were skipped: the run is diverging."""
        return self.in_a_row >= self.limit

    def error(self, step: int, output_dir: Path) -> RuntimeError:
        """What a failing run raises (after logging the step's metrics)."""
        return RuntimeError(
            f"stopped at step {step}: {self.in_a_row} updates in a row had a non-finite loss "
            f"or gradient and were skipped; the last good checkpoint is in "
            f"{output_dir / 'checkpoints'} (lower lr or check the data and rewards)"
        )


@dataclass
class Update:
    """What one update did: this process's summed loss, the gradient norm over all processes
    (before clipping) and whether the update was skipped."""

    loss: float
    grad_norm: float
    skipped: bool


class Updater:
    """Takes the optimizer updates of one model. ``model`` is the module gradients flow through
    (the prepared one); ``guard`` decides the skips and counts them in a row."""

    def __init__(
        self,
        accelerator: Any,
        parallel: Parallel,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        guard: UpdateGuard,
        max_grad_norm: float | None,
    ) -> None:
        self.accelerator, self.parallel = accelerator, parallel
        self.model, self.optimizer = model, optimizer
        self.guard, self.max_grad_norm = guard, max_grad_norm

    def backward(
        self,
        batches: Sequence[Batch],
        loss: Callable[[Batch], torch.Tensor],
        spare: Callable[[], torch.Tensor],
    ) -> float:
        """Accumulate the gradients of ``loss(batch)`` over ``batches`` (after the spare passes
        of ``spare()``, weighted 0); returns the summed loss."""
        acc = self.accelerator
        for _ in range(self.parallel.spare_passes(len(batches))):
            with acc.autocast():
                acc.backward(spare() * 0.0)
        total = 0.0
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last else acc.no_sync(self.model)
            with sync, acc.autocast():
                out = loss(batch)
                acc.backward(out)
            total += float(out.detach())
        return total

    def apply(self, loss: float, step: int) -> Update:
        """Clip the accumulated gradients and step, unless any process's ``loss`` or the norm is
        not finite (then skip, for all of them); the gradients are cleared either way."""
        grad_norm = float(self.parallel.clip_grad_norm(self.model, self.max_grad_norm))
        skipped = self.guard.skip(loss, grad_norm, step)
        if not skipped:
            self.optimizer.step()  # under fp16 this also updates the loss scale
        elif self.accelerator.scaler is not None:
            # fp16: an overflow is what a too-large loss scale looks like; back it off, or every
            # later step overflows as well and the run stops after max_bad_steps.
            self.accelerator.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return Update(loss, grad_norm, skipped)

    def __call__(
        self,
        batches: Sequence[Batch],
        loss: Callable[[Batch], torch.Tensor],
        spare: Callable[[], torch.Tensor],
        step: int,
    ) -> Update:
        """:meth:`backward` then :meth:`apply`: one whole update."""
        return self.apply(self.backward(batches, loss, spare), step)
