"""A global batch: a step's rows shared out among the processes, each with random streams of
its own, so that one run is the same on any number of processes (docs/scale.md).

RL: the step's prompts are the next ``num_prompts`` rows of the one seeded data order; of
``P`` processes, process ``p`` holds prompt groups ``[p n / P, (p + 1) n / P)`` (uneven shares
when ``P`` does not divide ``n``; the spare zero-weight passes keep the collectives paired).
Whatever is random about a group (its completions' tokens and positions, its views in each
optimizer pass) comes from a stream seeded by (run seed, step, global group index, use), and
advantages are computed on every process's rewards at once: a group gets the same rollouts,
advantages and views whichever process holds it. SFT: each micro-batch of ``batch_size`` rows
is shared out the same way, each row noised from its own stream. With the loss normalisers
counted over all processes and the gradients averaged, an update equals that of one process
holding the whole batch, up to the order of floating-point sums.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import gather_object


def check_share(name: str, count: int, processes: int) -> None:
    """Refuse a global ``count`` (config field ``name``) that leaves a process nothing."""
    if count < processes:
        raise ValueError(
            f"{name} ({count}) counts the whole step over all processes; it must be at least "
            f"the number of processes ({processes})"
        )


def share(count: int, accelerator: Any) -> range:
    """This process's contiguous share of ``count`` items split over all processes."""
    rank, processes = accelerator.process_index, accelerator.num_processes
    return range(rank * count // processes, (rank + 1) * count // processes)


def stream_seed(*keys: int | str) -> int:
    """A 63-bit seed mixed from ``keys`` (a hash), so nearby keys give unrelated streams."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass(frozen=True)
class StepGroups:
    """The groups of step ``step`` this process holds (``groups``: global indices), each of
    ``size`` rollouts, and their streams."""

    seed: int
    step: int
    groups: range
    size: int

    @classmethod
    def share(
        cls, seed: int, step: int, num_prompts: int, size: int, accelerator: Any
    ) -> StepGroups:
        """This process's contiguous share of the step's ``num_prompts`` groups."""
        return cls(seed, step, share(num_prompts, accelerator), size)

    @property
    def rows(self) -> slice:
        """This process's rollouts among the step's (groups in order)."""
        return slice(self.groups.start * self.size, self.groups.stop * self.size)

    def seeds(self, use: str) -> list[int]:
        """One seed per group for the draws of ``use`` (``sample``, ``views/0``, ...)."""
        return [stream_seed(self.seed, self.step, g, use) for g in self.groups]

    def generators(self, use: str) -> list[torch.Generator]:
        """One CPU generator per group, seeded as :meth:`seeds`."""
        return generators(self.seeds(use))

    def step_seed(self, use: str) -> int:
        """One seed for the whole step's ``use``, for draws not split by group (a
        uniform-noise model's, which runs on one process only)."""
        return stream_seed(self.seed, self.step, use)


def generators(seeds: list[int]) -> list[torch.Generator]:
    """A CPU generator per seed."""
    return [torch.Generator().manual_seed(s) for s in seeds]


def gather_rollouts(accelerator: Any, values: torch.Tensor) -> torch.Tensor:
    """Every process's per-rollout ``values`` ``[B]``, in the order of the step's groups
    (every process must call it)."""
    if accelerator.num_processes == 1:
        return values
    gathered: list[list[float]] = gather_object([values.tolist()])
    return torch.tensor([v for part in gathered for v in part], dtype=values.dtype)
