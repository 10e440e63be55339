"""``unmask sft``: masked-diffusion supervised fine-tuning, resumable, on ``accelerate``.

The trainer feeds (prompt ids, completion ids + EOS) pairs to the losses of
:mod:`unmask.objectives.sft_loss`: random masking for full-attention models, block SFT over
``[clean | noisy]`` for block-causal ones. It runs as one process per device (``accelerate
launch`` for DDP; a single CPU process here), with AdamW, linear warmup then cosine decay,
gradient accumulation and clipping, and bf16 autocast on GPUs.

Every ``save_every`` steps it writes an atomic checkpoint (:mod:`unmask.train.checkpoint`) with
the optimizer, scheduler, random states, data position and the metrics window being averaged,
so a resumed run continues, and logs, exactly as an uninterrupted one would. The run itself
(resume, cadences, time cap, the all-process skip of a non-finite update, final save) is the
skeleton RL shares (:mod:`unmask.train.run`). Metrics go to ``OUTPUT_DIR/metrics.jsonl``
(and TensorBoard with ``report_to: [tensorboard]``); the final model is saved to
``OUTPUT_DIR/final`` (merged; with LoRA the adapters also stay in ``OUTPUT_DIR/final_lora``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.utils import set_seed
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from unmask.models.diffusion_lm import DiffusionLM
from unmask.objectives.sft_loss import Noise, SFTLoss, resolve_objective, sample_noise, sft_loss
from unmask.objectives.views import SequenceBatch, collate
from unmask.sampling.sampler import SamplerConfig, pad_id
from unmask.tasks.registry import build_task
from unmask.train.blocks import adapt_block_size
from unmask.train.common import (
    BatchStream,
    build_optimizer,
    make_accelerator,
    pin_threads,
    training_model,
)
from unmask.train.distributed import Parallel
from unmask.train.global_batch import check_share, generators, share, stream_seed
from unmask.train.run import Run
from unmask.train.run_config import RunConfig
from unmask.train.sharding import resolve_fsdp
from unmask.train.update import UpdateGuard, Updater

logger = logging.getLogger(__name__)

Pair = tuple[list[int], list[int]]


@dataclass
class SFTData:
    """Training data: a task's ``prompt`` and ``target`` columns (see ``unmask.tasks``)."""

    task: str = "sudoku"
    options: dict[str, Any] = field(default_factory=dict)
    split: str = "train"
    max_length: int | None = None  # rows longer than this (prompt + target + EOS) are dropped


@dataclass
class SFTEval:
    """Held-out evaluation with the sampler: at step 0, every ``every`` steps and at the end.

    ``every: 0`` turns it off. Reported as ``eval/accuracy`` and ``eval/<reward>`` metrics.
    """

    every: int = 0
    split: str = "test"
    limit: int | None = 64
    batch_size: int = 64
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


@dataclass
class SFTConfig(RunConfig):
    """``unmask sft``: every field, with the CPU-friendly defaults of a tiny model.

    ``batch_size`` is the rows of a micro-batch over all processes (each holds its share, every
    row noised from a stream of its own): an optimizer step sees ``batch_size * grad_accum``
    rows, and a run is the same on any number of processes (:mod:`.global_batch`).
    ``objective: auto`` picks ``block`` for block-causal models and ``random_mask`` for full
    attention. ``elbo_weight`` applies the ELBO's 1/t weight; ``t_min``/``t_max`` bound the
    mask ratio. ``resume`` is ``latest`` or a checkpoint folder. ``mixed_precision: auto`` is
    bf16 on CUDA and fp32 on CPU (where bf16 autocast is slower for tiny models). ``lora``
    trains LoRA adapters on a frozen base (see ``unmask.models.lora``); the final model is
    merged. ``gradient_checkpointing`` trades compute for activation memory. ``block_size``
    trains at another block size than the model's own (block-size adaptation, docs/sft.md);
    the saved model keeps the new one. An update with a non-finite loss or gradient norm is
    skipped (``skipped_updates``); ``max_bad_steps`` of them in a row stop the run.
    ``max_time_s`` stops the run early, saving the final model, after that many seconds.
    """

    output_dir: str = "runs/sft"
    data: SFTData = field(default_factory=SFTData)
    objective: Literal["auto", "random_mask", "block"] = "auto"
    elbo_weight: bool = True
    t_min: float = 1e-3
    t_max: float = 1.0
    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    log_every: int = 10
    eval: SFTEval = field(default_factory=SFTEval)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.t_min <= self.t_max <= 1.0:
            raise ValueError(f"need 0 < t_min <= t_max <= 1, got {self.t_min}, {self.t_max}")
        if self.eval.every < 0:
            raise ValueError(f"eval.every must be >= 0, got {self.eval.every}")


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], targets: Sequence[str]
) -> list[Pair]:
    """(prompt ids, target ids + EOS) per row.

    The prompt is encoded as the sampler encodes it (special tokens added); the target without
    special tokens, then the EOS, which is trained so the model learns where to stop.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("SFT needs a tokenizer with an EOS token (it ends every target)")
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    return [(list(p), [*t, eos]) for p, t in zip(prompt_ids, target_ids, strict=True)]


class SFTTrainer(Run):
    """Masked-diffusion SFT. ``SFTTrainer(config).train()`` returns the final model's folder.

    ``model`` and ``pairs`` (prompt ids, completion ids ending in EOS) override
    ``config.model`` and ``config.data``; ``task`` is needed for evaluation (built from
    ``config.data`` when not given). ``core`` is the model being trained, ``model`` the same
    network as prepared for gradients (DDP-wrapped; under FSDP2 ``core`` itself).
    """

    name = "sft"

    def __init__(
        self,
        config: SFTConfig,
        model: DiffusionLM | None = None,
        pairs: Sequence[Pair] | None = None,
        task: Any = None,
    ) -> None:
        self.config = cfg = config
        self.accelerator = acc = make_accelerator(
            cfg.mixed_precision, cfg.cpu, "sft", cfg.grad_accum > 1
        )
        check_share("batch_size", cfg.batch_size, acc.num_processes)
        set_seed(cfg.seed)
        model = training_model(model, cfg.model, acc.device, cfg.lora, cfg.gradient_checkpointing)
        adapt_block_size(model, cfg.block_size)
        pin_threads(model, acc.device, cfg.cpu_threads)
        self.core = model.to(acc.device).train()
        self.objective = resolve_objective(cfg.objective, model.layout)
        if task is None and (pairs is None or cfg.eval.every):
            task = build_task(cfg.data.task, cfg.data.options, model.tokenizer)
        self.task = task
        if pairs is None:
            if model.tokenizer is None:
                raise ValueError(f"model {cfg.model!r} has no tokenizer to encode the task with")
            rows = task.dataset(cfg.data.split)
            pairs = encode_pairs(model.tokenizer, rows["prompt"], rows["target"])
        self.pairs = _filter_length(list(pairs), cfg.data.max_length)
        self.stream = BatchStream(len(self.pairs), cfg.seed)
        self.parallel = Parallel(acc, resolve_fsdp(cfg.fsdp, acc.mixed_precision))
        self.parallel.shard(model)
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.adam_betas)
        # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would
        # step it once per process).
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
        self.model, self.optimizer = self.parallel.prepare(self.core, optimizer)
        self.output_dir = Path(cfg.output_dir)
        self._last_lr = cfg.lr
        self.guard = UpdateGuard(acc, cfg.max_bad_steps)
        self.updater = Updater(acc, self.parallel, self.model, self.optimizer, self.guard,
                               cfg.max_grad_norm)  # fmt: skip
        self.window = _Window()  # step statistics since the last logged step; checkpointed

    # -- the run skeleton's hooks ----------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        stats = self._step(step)
        self.window.add(stats)
        return stats

    def logged(self, metrics: dict[str, float]) -> dict[str, float]:
        """The window's averages since the last logged step."""
        logged = self.window.flush()
        logged.update(lr=self._last_lr, epoch=self.stream.epoch, block_size=self.core.block_size,
                      elapsed_s=self.elapsed_s)  # fmt: skip
        return logged

    def postfix(self, logged: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{logged['loss']:.4f}", "tok_s": f"{logged['tokens_per_s']:.0f}"}

    def extra_state(self) -> dict[str, Any]:
        return {"metrics_window": self.window.state_dict()}

    def load_extra_state(self, state: dict[str, Any], path: Path) -> None:
        # Checkpoints written before the window was saved resume with an empty one.
        self.window.load_state_dict(state.get("metrics_window", []))

    # -- one optimizer step ----------------------------------------------------------------
    def _step(self, step: int) -> dict[str, float]:
        """Optimizer step ``step`` over ``grad_accum`` micro-batches (skipped when the loss or
        gradient is not finite); returns global sums."""
        cfg, acc = self.config, self.accelerator
        began = time.perf_counter()
        size = cfg.batch_size
        rows = self.stream.take(size * cfg.grad_accum)
        noised = []
        for j in range(cfg.grad_accum):  # this process's share of each micro-batch
            index = [j * size + k for k in share(size, acc)]
            batch = collate(
                [self.pairs[rows[i]] for i in index],
                pad_id(self.core),
                self.core.block_size,
                self.core.settings.block_align,
                whole_blocks=self.objective == "block",
            ).to(acc.device)
            streams = generators([stream_seed(cfg.seed, step, i, "noise") for i in index])
            noise = sample_noise(batch, self.objective, cfg.t_min, cfg.t_max, streams)
            noised.append((batch, noise))
        batches = [b for b, _ in noised]
        local_tokens = sum(b.num_completion_tokens for b in batches)
        total = acc.reduce(torch.tensor(float(local_tokens), device=acc.device), "sum")
        # DDP averages gradients over processes: scale so the step's loss is per token of the
        # global batch.
        normalizer = max(float(total), 1.0) / acc.num_processes
        nll = masked = 0.0

        def forward(pair: tuple[SequenceBatch, Noise]) -> SFTLoss:
            return sft_loss(self.model, self.core.settings, pair[0], pair[1], self.objective,
                            cfg.elbo_weight, normalizer)  # fmt: skip

        def loss(pair: tuple[SequenceBatch, Noise]) -> torch.Tensor:
            nonlocal nll, masked
            out = forward(pair)
            nll += out.nll_sum
            masked += out.masked_tokens
            return out.loss

        self._last_lr = self.optimizer.param_groups[0]["lr"]
        update = self.updater(noised, loss, lambda: forward(noised[0]).loss, step)
        self.scheduler.step()
        seq_tokens = sum(int(b.real.sum()) for b in batches)
        sums = torch.tensor([update.loss, nll, masked, seq_tokens, local_tokens], device=acc.device)
        loss_sum, nll, masked, seq_tokens, comp_tokens = acc.reduce(sums, "sum").tolist()
        return {
            "loss": loss_sum / acc.num_processes,
            "nll": nll,
            "masked": masked,
            "tokens": seq_tokens,
            "completion_tokens": comp_tokens,
            "grad_norm": update.grad_norm,
            "seconds": time.perf_counter() - began,
            "skipped_updates": float(update.skipped),
        }


def train_sft(config: SFTConfig) -> Path:
    """Run SFT as configured; returns the folder of the final model (``OUTPUT_DIR/final``)."""
    return SFTTrainer(config).train()


class _Window:
    """Step statistics between two logging steps, averaged when logged. Its state is
    checkpointed, so a resumed run's first line averages the same steps as an uninterrupted
    run's (JSON keeps floats exactly, so the logged values are equal)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def add(self, stats: dict[str, float]) -> None:
        self.steps.append(stats)

    def flush(self) -> dict[str, float]:
        total = {k: sum(s[k] for s in self.steps) for k in self.steps[0]}
        n = len(self.steps)
        self.steps = []
        metrics = {
            "loss": total["loss"] / n,
            "nll": total["nll"] / max(total["masked"], 1.0),
            "mask_ratio": total["masked"] / max(total["completion_tokens"], 1.0),
            "grad_norm": total["grad_norm"] / n,
            "tokens_per_s": total["tokens"] / max(total["seconds"], 1e-9),
            "step_s": total["seconds"] / n,
        }
        if total["skipped_updates"]:  # as RL: only when an update was skipped
            metrics["skipped_updates"] = total["skipped_updates"]
        return metrics

    def state_dict(self) -> list[dict[str, float]]:
        return [dict(s) for s in self.steps]

    def load_state_dict(self, steps: list[dict[str, float]]) -> None:
        self.steps = [dict(s) for s in steps]


def _filter_length(pairs: list[Pair], max_length: int | None) -> list[Pair]:
    if max_length is None:
        return pairs
    kept = [(p, c) for p, c in pairs if len(p) + len(c) <= max_length]
    if len(kept) < len(pairs):
        logger.warning(
            "dropped %d of %d rows longer than %d", len(pairs) - len(kept), len(pairs), max_length
        )
    if not kept:
        raise ValueError(f"data.max_length={max_length} drops every row")
    return kept
