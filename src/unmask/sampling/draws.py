"""The sampler's random numbers: one stream for the whole batch, or one per group of rows.

With one stream, a row's draws depend on everything else in its batch. RL needs a prompt's
group of completions to come out the same whichever process samples it, alone or beside other
groups (a global batch, docs/scale.md), so there each group of consecutive rows draws from its
own generator, and only at the steps where one of its rows still has masked positions: what a
group draws then depends on its rows alone. The draws are what ``torch.multinomial`` draws
(``Exp(1)`` per candidate token, :func:`~unmask.sampling.remasking.propose`), so one stream
samples exactly as ``multinomial`` with that generator would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Fill = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


class Draws:
    """Random numbers for a batch of ``rows``: from ``seed`` (None: torch's global generator)
    for all of them, or, with ``group_seeds``, from one generator per equal group of
    consecutive rows (``rows`` must split evenly into ``len(group_seeds)``)."""

    def __init__(
        self,
        rows: int,
        device: torch.device,
        seed: int | None = None,
        group_seeds: Sequence[int] | None = None,
    ) -> None:
        self.device = device
        self.generator: torch.Generator | None = None
        self.groups: list[torch.Generator] = []
        if group_seeds is not None:
            if not group_seeds or rows % len(group_seeds):
                raise ValueError(
                    f"{len(group_seeds)} group seeds do not split {rows} rows into equal groups"
                )
            self.groups = [torch.Generator(device=device).manual_seed(s) for s in group_seeds]
            self.size = rows // len(group_seeds)
        elif seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def exponential(self, shape: torch.Size, busy: torch.Tensor) -> torch.Tensor:
        """``Exp(1)`` draws of ``shape`` (``[B, ...]``); ``busy`` ``[B]``: rows with masked
        positions (a group whose rows are all idle draws nothing; its entries are 1)."""
        return self._draw(shape, busy, lambda out, g: out.exponential_(generator=g))

    def uniform(self, shape: torch.Size, busy: torch.Tensor) -> torch.Tensor:
        """``U(0, 1)`` draws of ``shape``, like :meth:`exponential`."""
        return self._draw(shape, busy, lambda out, g: out.uniform_(generator=g))

    def _draw(self, shape: torch.Size, busy: torch.Tensor, fill: Fill) -> torch.Tensor:
        out = torch.empty(shape, device=self.device)
        if not self.groups:
            return fill(out, self.generator)
        out.fill_(1.0)
        drawing = busy.view(len(self.groups), self.size).any(dim=1).tolist()
        for i, (generator, on) in enumerate(zip(self.groups, drawing, strict=True)):
            if on:
                fill(out[i * self.size : (i + 1) * self.size], generator)
        return out
