"""How the SFT and RL trainers set up: accelerator, the model to train, optimizer, data order.

The run itself (resume, cadences, checkpoints, final save) is :mod:`unmask.train.run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from unmask.models.loading import DiffusionModel, load_model
from unmask.models.lora import LoRAConfig, add_lora, has_lora, quantization_config


def make_accelerator(
    mixed_precision: str, cpu: bool, trainer: str, accumulates: bool
) -> Accelerator:
    """``mixed_precision: auto`` is bf16 on CUDA and fp32 on CPU (bf16 autocast does not pay
    off for tiny models there). ``accumulates``: the trainer sums several micro-batches into
    one optimizer step (see :func:`check_distribution`)."""
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and not cpu else "no"
    acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    check_distribution(acc, trainer, accumulates)
    return acc


def check_distribution(acc: Any, trainer: str, accumulates: bool) -> None:
    """Refuse the sharded set-ups a trainer would run wrongly (docs/scale.md), before any work.

    FSDP2 is applied by the trainers themselves (:mod:`unmask.train.sharding`); FSDP1 and
    ZeRO-3 shard the weights in ways rollouts, evaluation and checkpoints do not handle. Under
    DeepSpeed, accelerate steps the engine after every backward, so micro-batches accumulated
    into one optimizer step would each take a step.
    """
    kind = acc.distributed_type
    stage = 0
    if kind == DistributedType.DEEPSPEED:
        stage = int(getattr(acc.state.deepspeed_plugin, "zero_stage", 0) or 0)
    fsdp1 = kind == DistributedType.FSDP and getattr(acc.state.fsdp_plugin, "fsdp_version", 1) != 2
    if fsdp1 or stage == 3:
        raise ValueError(
            f"{trainer}: {'FSDP1' if stage != 3 else 'DeepSpeed ZeRO-3'} shards the weights, "
            "which this trainer does not handle; launch with configs/accelerate/fsdp.yaml "
            "(FSDP2) or configs/accelerate/ddp.yaml (docs/scale.md)"
        )
    if kind == DistributedType.DEEPSPEED and accumulates:
        raise ValueError(
            f"{trainer}: under DeepSpeed every micro-batch would take an optimizer step; use "
            "configs/accelerate/ddp.yaml"
            + (", or grad_accum: 1" if trainer == "sft" else "")
            + " (docs/scale.md)"
        )


def training_model(
    model: DiffusionModel | None,
    name: str,
    device: torch.device,
    lora: LoRAConfig | None = None,
    gradient_checkpointing: bool = False,
) -> DiffusionModel:
    """The model a trainer updates (``model``, else loaded from ``name``).

    Full training keeps fp32 weights (bf16 autocast on GPUs). With ``lora`` the base is frozen,
    in bf16 on GPUs (4-bit with ``lora.load_in_4bit``), and only fp32 adapters train; a model
    that already has adapters (a LoRA folder) keeps them. Gradient checkpointing recomputes
    each layer's activations in the backward pass instead of storing them.
    """
    if model is None:
        if lora is not None and lora.load_in_4bit:
            model = load_model(
                name, dtype="bfloat16", device=device, quantization_config=quantization_config()
            )
        else:
            dtype = "float32" if lora is None else "auto"
            model = load_model(name, dtype=dtype, device=device)
    if gradient_checkpointing:  # the method's name in transformers 5.2x, and before
        enable = getattr(model.model, "activation_checkpointing_enable", None)
        (enable or model.model.gradient_checkpointing_enable)({"use_reentrant": False})
    if lora is not None and not has_lora(model):
        if lora.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            prepare_model_for_kbit_training(model.model, gradient_checkpointing)
        add_lora(model, lora)
    return model


# Models under this many parameters train on one CPU thread by default (``cpu_threads``).
TINY_MODEL_PARAMETERS = 5_000_000


def pin_threads(model: nn.Module, device: torch.device, threads: int | None) -> None:
    """Set torch's intra-op threads for a CPU run: ``threads``, or for a model under
    :data:`TINY_MODEL_PARAMETERS` one thread. Such a model's matrices are too small to split:
    a second thread only adds barriers (slower still when another job holds the other core,
    benchmarks/RESULTS.md), and one thread gives the same sums, hence the same model, on any
    machine. Larger models keep torch's default unless ``threads`` is set."""
    if device.type != "cpu":
        return
    if threads is None:
        if sum(p.numel() for p in model.parameters()) >= TINY_MODEL_PARAMETERS:
            return
        threads = 1
    if threads < 1:
        raise ValueError(f"cpu_threads must be >= 1 or null, got {threads}")
    torch.set_num_threads(threads)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off in the policy, as TRL does: the sampler scores in eval mode and the loss in
    train mode, so with dropout on (LoRA's default 0.05) on-policy ratios are not 1. Setting
    ``p = 0`` instead of calling ``eval()`` keeps gradient checkpointing, which transformers
    only applies in train mode."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: Sequence[float]
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(betas[0], betas[1]),
    )


class BatchStream:
    """Row indices in a fresh seeded permutation per epoch; its position is checkpointed."""

    def __init__(self, size: int, seed: int) -> None:
        if size < 1:
            raise ValueError("the training data has no rows")
        self.size, self.seed = size, seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def take(self, count: int) -> list[int]:
        """The next ``count`` row indices, starting a new seeded epoch when one runs out."""
        out: list[int] = []
        while len(out) < count:
            if self.index == self.size:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(count - len(out), self.size - self.index)
            out.extend(self._order[self.index : self.index + take])
            self.index += take
        return out

    def state_dict(self) -> dict[str, int]:
        """The position in the data (epoch, index), saved with checkpoints."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved position: the same rows follow as in an uninterrupted run."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()
