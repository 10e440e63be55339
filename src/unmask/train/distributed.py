"""How a trainer's model is spread over processes: accelerate's DDP, or FSDP2 (:mod:`.sharding`).

The trainers talk to :class:`Parallel` only, so both set-ups run the same loop: prepare the
model, get the whole model for rollouts, evaluation and saving, clip gradients, and keep the
processes' collective passes in step. :func:`on_any_process` and :func:`over_processes` make
the processes take one branch and report one set of metrics.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import nn

from unmask.models.diffusion_lm import DiffusionLM
from unmask.train import sharding
from unmask.train.checkpoint import load_model_weights
from unmask.train.sharding import FSDPConfig


class Parallel:
    """DDP through ``accelerator.prepare``, or, when ``fsdp`` is enabled, FSDP2 applied here."""

    def __init__(self, accelerator: Any, fsdp: FSDPConfig) -> None:
        self.accelerator = accelerator
        self.fsdp = fsdp
        self.sharded = fsdp.enabled and accelerator.num_processes > 1
        self._template: DiffusionLM | None = None

    def shard(self, model: DiffusionLM, reference: Any = None) -> None:
        """Shard ``model`` (and a frozen ``reference`` copy, if any) in place; build the
        optimizer afterwards, on the sharded parameters. An adapter-disabled LoRA reference is
        the model itself, sharded with it."""
        if not self.sharded:
            return
        self._template = sharding.meta_template(model)
        sharding.shard(model, self.fsdp)
        if isinstance(reference, DiffusionLM):
            sharding.shard(reference, self.fsdp)

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """The module to call for gradients and the optimizer to step."""
        if self.sharded:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    @contextmanager
    def whole(
        self, model: nn.Module, dtype: torch.dtype | None = None, main_only: bool = False
    ) -> Iterator[Any]:
        """The unsharded model: under FSDP2 a replica gathered on every process (in ``dtype``,
        else the weights' own dtypes; ``main_only``: on the main process, in host memory, and
        None elsewhere), freed on exit; otherwise the model itself. Every process enters it."""
        if not self.sharded:
            yield self.accelerator.unwrap_model(model)
            return
        assert self._template is not None
        device = self.accelerator.device
        with sharding.gathered_replica(model, self._template, dtype, device, main_only) as replica:
            yield replica

    def load_weights(self, path: Path, model: DiffusionLM) -> None:
        """Load a checkpoint's consolidated weights into the sharded ``model`` (each process
        keeps its shards; the optimizer state is loaded by ``load_checkpoint``)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        assert self._template is not None
        host = copy.deepcopy(self._template).to_empty(device="cpu")
        sharding.tie_weights(host)
        load_model_weights(host, path)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, host.state_dict(), options=options)

    def sampling_dtype(self) -> torch.dtype | None:
        """The dtype rollouts run in: bf16 under the bf16 policy, else the weights' own."""
        return torch.bfloat16 if self.fsdp.bf16 else None

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> float:
        """Clip gradients (over all processes) to ``max_norm``; the norm before clipping."""
        if self.sharded:
            return sharding.clip_grad_norm(model, max_norm)
        norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
        return float(norm)

    def spare_passes(self, local: int) -> int:
        """Zero-weight forward and backward passes this process adds to its ``local`` ones:
        under FSDP2 as many as another process runs more (every pass is a collective); under
        DDP one when it has none while another has some (the gradient all-reduce waits)."""
        missing = sharding.missing_passes(self.accelerator, local)
        if self.sharded:
            return missing
        return int(local == 0 and missing > 0)


def on_any_process(accelerator: Any, flag: bool) -> bool:
    """Whether ``flag`` holds on any process, so that all of them take the same branch."""
    if accelerator.num_processes == 1:
        return flag
    count = accelerator.reduce(
        torch.tensor([float(flag)], device=accelerator.device), reduction="sum"
    )
    return bool(count.item() > 0)


def over_processes(accelerator: Any, metrics: dict[str, float]) -> dict[str, float]:
    """Every process's step metrics in one: the maximum of ``max_*`` keys, the minimum of
    ``min_*`` ones and the mean of the rest (a key only some processes have: over those)."""
    if accelerator.num_processes == 1:
        return metrics
    gathered: list[dict[str, float]] = gather_object([metrics])
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for m in gathered for k in m):
        values = [m[key] for m in gathered if key in m]
        words = key.rsplit("/", 1)[-1].split("_")
        if "max" in words:
            out[key] = max(values)
        elif "min" in words:
            out[key] = min(values)
        else:
            out[key] = sum(values) / len(values)
    return out
