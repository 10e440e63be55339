"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainers, the same code on CPU and GPU.

Accelerate ignores its FSDP plugin on CPU (it falls back to DDP), so the trainers shard the
model themselves: one FSDP unit per decoder layer, then the root (embeddings, final norm, LM
head). Parameters, gradients and optimizer states then live 1/N on each of N processes.
Whatever needs the whole model at once (rollouts, evaluation, saving) asks for an unsharded
replica, gathered once (:func:`gathered_replica`), instead of sampling hundreds of denoising
steps through per-layer all-gathers.

Every forward and backward of a sharded model is a collective: all processes must run the
same number of them (:func:`missing_passes`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from unmask.models.diffusion_lm import DiffusionLM


@dataclass
class FSDPConfig:
    """``fsdp:`` of ``unmask sft`` and ``unmask rl`` (docs/scale.md, "What runs sharded").

    ``enabled``: shard with FSDP2 (also turned on by accelerate's ``fsdp_version: 2`` config).
    ``bf16``: the mixed-precision policy of GPUs: bf16 compute weights, fp32 gradient
    reduction and fp32 master weights. ``cpu_offload``: keep the sharded weights, gradients
    and optimizer states in host memory. ``reshard_after_forward``: free each layer's gathered
    weights after its forward (less memory, one more all-gather in the backward).
    """

    enabled: bool = False
    bf16: bool = False
    cpu_offload: bool = False
    reshard_after_forward: bool = True


def resolve_fsdp(config: FSDPConfig, mixed_precision: str) -> FSDPConfig:
    """The settings to run with: ``config``, or those of an ``accelerate launch`` with an
    FSDP2 config (read from the environment it sets, on CPU too, where accelerate itself
    would fall back to DDP). FSDP1 configs are refused, and so is fp16 under FSDP2."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise ValueError(
                "accelerate's FSDP1 is not supported: set fsdp_version: 2 in the accelerate "
                "config (configs/accelerate/fsdp.yaml)"
            )
        flag = {"true": True, "false": False}
        config = replace(
            config,
            enabled=True,
            bf16=config.bf16 or mixed_precision == "bf16",
            cpu_offload=config.cpu_offload or flag[os.environ.get("FSDP_OFFLOAD_PARAMS", "false")],
            reshard_after_forward=flag[os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true")],
        )
    if config.enabled and mixed_precision == "fp16":
        # The sharded gradients are clipped without accelerate's unscaling, so fp16's loss
        # scaler would clip scaled gradients and never see an overflow.
        raise ValueError("mixed_precision: fp16 is not supported with FSDP2; use bf16 (or no)")
    return config


def decoder_layers(model: DiffusionLM) -> list[nn.Module]:
    """The transformer blocks of a model (under LoRA too), one FSDP unit each."""
    inner = model.model
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return list(base.get_decoder().layers)


def shard(model: DiffusionLM, config: FSDPConfig) -> None:
    """Shard ``model`` in place over all processes: each decoder layer, then the root."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {"reshard_after_forward": config.reshard_after_forward}
    if config.bf16:
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if config.cpu_offload:  # pinned host memory (fast copies) needs an accelerator to exist
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.accelerator.is_available())
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)


def meta_template(model: DiffusionLM) -> DiffusionLM:
    """A copy of ``model``'s structure with its parameters on the meta device (no memory; tied
    weights stay tied) and its buffers and tokenizer as they are: what a replica is built from
    once the model is sharded."""
    memo: dict[int, Any] = {id(model.tokenizer): model.tokenizer}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(
            torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
        )
    return copy.deepcopy(model, memo)


def tie_weights(model: DiffusionLM) -> None:
    """Tie the weights the config ties (embeddings and LM head), under LoRA too: a replica
    built from a meta template has them as separate tensors."""
    inner = model.model
    (inner.get_base_model() if hasattr(inner, "get_base_model") else inner).tie_weights()


def _options(main_only: bool) -> Any:
    """Full (unsharded) state dicts; ``main_only``: on the main process alone, in host memory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=main_only)


@contextmanager
def gathered_replica(
    model: nn.Module,
    template: DiffusionLM,
    dtype: torch.dtype | None,
    device: torch.device,
    main_only: bool = False,
) -> Iterator[DiffusionLM | None]:
    """An unsharded copy of the sharded ``model`` on every process (in ``dtype``, else each
    weight's own), gathered once and freed on exit: rollouts and evaluation run on it without
    collectives, so processes may stop at EOS after different numbers of steps. ``main_only``:
    the copy is on the main process, in host memory (saving); the others get None."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(main_only))
    if not state:  # main_only, on another process
        yield None
        return
    if main_only:
        device = torch.device("cpu")
    state = {k: _own_storage(v.to(device=device, dtype=dtype or v.dtype)) for k, v in state.items()}
    replica = copy.deepcopy(template)
    replica.load_state_dict(state, assign=True)
    tie_weights(replica)
    del state
    try:
        yield replica.to(device)
    finally:
        del replica


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied when it is a view into a larger storage: FSDP2 gathers a parameter
    whose rows do not split evenly over the processes into a padded buffer, and safetensors
    refuses to save tied weights (a LoRA folder's embeddings and LM head) held that way."""
    if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone()


def clip_grad_norm(model: nn.Module, max_norm: float | None) -> float:
    """Clip the (sharded) gradients of ``model`` to ``max_norm`` over all processes; returns
    the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.grad is not None], max_norm or float("inf")
    )
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def missing_passes(accelerator: Any, local: int) -> int:
    """How many extra (zero-weight) passes this process must run so that all processes run as
    many as the busiest one: sharded forwards and backwards are collectives."""
    if accelerator.num_processes == 1:
        return 0
    count = torch.tensor([float(local)], device=accelerator.device)
    return int(accelerator.reduce(count, reduction="max").item()) - local
