"""What the SFT and RL trainers share: accelerator, optimizer, data order, resume, evaluation."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from torch import nn

from unmask.models.diffusion_lm import DiffusionLM
from unmask.models.loading import DiffusionModel, load_model
from unmask.models.lora import LoRAConfig, add_lora, has_lora, merge_lora, quantization_config
from unmask.models.saving import save_model
from unmask.train.checkpoint import capture_rng_state, latest_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)


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


def adapt_block_size(model: DiffusionLM, block_size: int | None) -> None:
    """Train ``model`` at ``block_size`` (the config's ``block_size``; None keeps the native one).

    The trainer's rows, the sampler's default decoding block and the saved model's settings
    all follow, so the adapted model is a block-``block_size`` model (docs/rl.md).
    """
    if block_size is None or block_size == model.block_size:
        return
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1 or null, got {block_size}")
    logger.info("block-size adaptation: %s block %d -> %d", model.layout, model.block_size,
                block_size)  # fmt: skip
    model.set_block_size(block_size)


def save_final(model: DiffusionLM, path: Path) -> Path:
    """Save the trained model to ``path``; a LoRA model is first saved as it is, adapters and
    all, to ``path`` + ``_lora``, then merged (in place) into a plain native model."""
    if has_lora(model):
        save_model(model, path.with_name(f"{path.name}_lora"))
        merge_lora(model)
    return save_model(model, path)


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
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()


def save_run_checkpoint(
    trainer: Any,
    step: int,
    generators: dict[str, torch.Generator],
    trainer_state: dict[str, Any],
    model_view: Callable[[nn.Module], nn.Module] = lambda model: model,
) -> Path:
    """Checkpoint ``step`` of an SFT or RL trainer; every process calls it. The RNG states of
    all processes are gathered, the whole model and optimizer state are put together (they
    may be sharded), and the main process writes ``model_view`` of the model with them.
    ``trainer`` has ``accelerator``, ``parallel``, ``model``, ``optimizer``, ``scheduler``,
    ``output_dir`` and ``config.keep_last``."""
    acc = trainer.accelerator
    rng = [capture_rng_state(generators)]
    if acc.num_processes > 1:
        rng = gather_object(rng)
    path = trainer.output_dir / "checkpoints"
    optimizer = trainer.parallel.optimizer_state(trainer.model, trainer.optimizer)
    with trainer.parallel.whole(trainer.model, main_only=True) as model:
        if acc.is_main_process:
            path = save_checkpoint(
                trainer.output_dir, step, model_view(model), optimizer, trainer.scheduler,
                trainer_state, rng_states=rng, keep_last=trainer.config.keep_last,
            )  # fmt: skip
    acc.wait_for_everyone()
    return path


def checkpoint_to_resume(output_dir: Path, resume: str | None, main: bool = True) -> Path | None:
    """The checkpoint ``resume`` names (``latest`` or a folder), or None for a fresh run.

    A fresh run into a folder that already holds checkpoints is refused: it would silently
    mix two runs' metrics and checkpoints. ``resume=latest`` with no checkpoint yet starts
    from step 0 with a notice (on the ``main`` process), so a cluster's requeue loop can
    always pass ``--resume``.
    """
    if resume is None:
        existing = latest_checkpoint(output_dir)
        if existing is not None:
            raise ValueError(
                f"{output_dir} already has checkpoints (latest: {existing}); resume with "
                "resume=latest or choose another output_dir"
            )
        return None
    path = latest_checkpoint(output_dir) if resume == "latest" else Path(resume)
    if path is None and main:
        notice(f"resume=latest: no checkpoint in {output_dir / 'checkpoints'} yet; "
               "starting from step 0")  # fmt: skip
    return path


def notice(message: str) -> None:
    """A warning the user must see: logged, and printed to stderr unless logging has no
    handler at all (Python's last-resort handler prints it there already)."""
    logger.warning(message)
    if logger.hasHandlers():
        print(message, file=sys.stderr)


def on_any_process(accelerator: Any, flag: bool) -> bool:
    """Whether ``flag`` holds on any process, so that all of them take the same branch."""
    if accelerator.num_processes == 1:
        return flag
    count = accelerator.reduce(
        torch.tensor([float(flag)], device=accelerator.device), reduction="sum"
    )
    return bool(count.item() > 0)


class UpdateGuard:
    """Skips an optimizer update whose loss or gradient norm is not finite on any process
    (all processes skip together, so replicas stay identical and no NaN reaches the weights),
    and counts such updates in a row: after ``limit`` of them the run is diverging and stops.
    """

    def __init__(self, accelerator: Any, limit: int) -> None:
        self.accelerator, self.limit = accelerator, limit
        self.in_a_row = 0

    def skip(self, loss: float, grad_norm: float, step: int) -> bool:
        """Whether to skip this update (warns when it does)."""
        bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not on_any_process(self.accelerator, bad):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        logger.warning(
            "step %d: non-finite loss (%s) or gradient norm (%s); update skipped",
            step, loss, grad_norm,
        )  # fmt: skip
        return True

    @property
    def failing(self) -> bool:
        return self.in_a_row >= self.limit

    def error(self, step: int, output_dir: Path) -> RuntimeError:
        """What a failing run raises (after logging the step's metrics)."""
        return RuntimeError(
            f"stopped at step {step}: {self.in_a_row} updates in a row had a non-finite loss "
            f"or gradient and were skipped; the last good checkpoint is in "
            f"{output_dir / 'checkpoints'} (lower lr or check the data and rewards)"
        )


def eval_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The ``eval/...`` metrics of an evaluation summary."""
    metrics = {
        "eval/accuracy": summary["accuracy"],
        "eval/nfe": summary["mean_nfe"],
        "eval/reward": summary["reward"],
    }
    for key, value in summary.items():
        if key.startswith("reward/") and key.endswith("/mean"):
            metrics[f"eval/{key.split('/')[1]}"] = value
    return metrics


def write_plots(output_dir: Path) -> None:
    """PNG plots of the run's metrics in ``OUTPUT_DIR/plots``. A plotting failure only warns:
    the model is saved by then."""
    from unmask.viz.plots import plot_metrics

    try:
        plot_metrics(output_dir)
    except Exception as err:
        logger.warning("could not plot %s: %s", output_dir / "metrics.jsonl", err)
