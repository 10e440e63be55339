"""``unmask sft``: masked-diffusion supervised fine-tuning, resumable, on ``accelerate``.

The trainer feeds (prompt ids, completion ids + EOS) pairs to the losses of
:mod:`unmask.objectives.sft_loss`: random masking for full-attention models, block SFT over
``[clean | noisy]`` for block-causal ones. It runs as one process per device (``accelerate
launch`` for DDP; a single CPU process here), with AdamW, linear warmup then cosine decay,
gradient accumulation and clipping, and bf16 autocast on GPUs.

Every ``save_every`` steps it writes an atomic checkpoint (:mod:`unmask.train.checkpoint`) with
the optimizer, scheduler, random states, data position and the metrics window being averaged,
so a resumed run continues, and logs, exactly as an uninterrupted one would. An update with a
non-finite loss or gradient is skipped, as in RL. Metrics go to ``OUTPUT_DIR/metrics.jsonl``
(and TensorBoard with ``report_to: [tensorboard]``); the final model is saved to
``OUTPUT_DIR/final`` (merged; with LoRA the adapters also stay in ``OUTPUT_DIR/final_lora``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from unmask.config import to_dict
from unmask.metrics import MetricsWriter
from unmask.models.diffusion_lm import DiffusionLM
from unmask.models.lora import LoRAConfig
from unmask.objectives.sft_loss import resolve_objective, sample_noise, sft_loss
from unmask.objectives.views import collate
from unmask.sampling.sampler import SamplerConfig, pad_id
from unmask.tasks.registry import build_task
from unmask.train.checkpoint import load_checkpoint
from unmask.train.common import (
    BatchStream,
    UpdateGuard,
    adapt_block_size,
    build_optimizer,
    checkpoint_to_resume,
    eval_metrics,
    make_accelerator,
    pin_threads,
    save_final,
    save_run_checkpoint,
    training_model,
    write_plots,
)
from unmask.train.distributed import Parallel
from unmask.train.pace import Pace
from unmask.train.sharding import FSDPConfig, resolve_fsdp

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
class SFTConfig:
    """``unmask sft``: every field, with the CPU-friendly defaults of a tiny model.

    ``batch_size`` is per process and per micro-batch: an optimizer step sees
    ``batch_size * grad_accum * processes`` rows. ``objective: auto`` picks ``block`` for
    block-causal models and ``random_mask`` for full attention. ``elbo_weight`` applies the
    ELBO's 1/t weight; ``t_min``/``t_max`` bound the mask ratio. ``resume`` is ``latest`` or a
    checkpoint folder. ``mixed_precision: auto`` is bf16 on CUDA and fp32 on CPU (where bf16
    autocast is slower for tiny models). ``lora`` trains LoRA adapters on a frozen base (see
    ``unmask.models.lora``); the final model is merged. ``gradient_checkpointing`` trades
    compute for activation memory. ``block_size`` trains at another block size than the
    model's own (block-size adaptation, docs/sft.md); the saved model keeps the new one.
    An update with a non-finite loss or gradient norm is skipped (``skipped_updates``);
    ``max_bad_steps`` of them in a row stop the run.
    """

    model: str = "micro-block"
    output_dir: str = "runs/sft"
    resume: str | None = None
    seed: int = 0
    data: SFTData = field(default_factory=SFTData)
    block_size: int | None = None
    objective: Literal["auto", "random_mask", "block"] = "auto"
    elbo_weight: bool = True
    t_min: float = 1e-3
    t_max: float = 1.0
    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    cpu: bool = False
    lora: LoRAConfig | None = None
    gradient_checkpointing: bool = False
    cpu_threads: int | None = None  # None: 1 for models under 5M parameters on CPU
    save_every: int = 0  # 0: no intermediate checkpoints
    keep_last: int = 2
    max_bad_steps: int = 3  # stop after this many non-finite (skipped) updates in a row
    log_every: int = 10
    report_to: list[str] = field(default_factory=list)
    progress: bool = True
    plots: bool = True  # PNGs of the metrics in OUTPUT_DIR/plots at the end
    eval: SFTEval = field(default_factory=SFTEval)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "keep_last", "log_every",
                     "max_bad_steps"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1 or null, got {self.block_size}")
        for name in ("warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.t_min <= self.t_max <= 1.0:
            raise ValueError(f"need 0 < t_min <= t_max <= 1, got {self.t_min}, {self.t_max}")
        if len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas must be two numbers, got {self.adam_betas}")
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


class SFTTrainer:
    """Masked-diffusion SFT. ``SFTTrainer(config).train()`` returns the final model's folder.

    ``model`` and ``pairs`` (prompt ids, completion ids ending in EOS) override
    ``config.model`` and ``config.data``; ``task`` is needed for evaluation (built from
    ``config.data`` when not given).
    """

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
        self.generator = torch.Generator().manual_seed(cfg.seed + acc.process_index)
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
        self.window = _Window()  # step statistics since the last logged step; checkpointed
        self._elapsed_before = 0.0  # training seconds of the run before this process resumed it
        self._began = time.perf_counter()

    # -- the loop --------------------------------------------------------------------------
    def train(self) -> Path:
        cfg, acc = self.config, self.accelerator
        start = self._resume()
        main = acc.is_main_process
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
        writer = MetricsWriter(
            self.output_dir, cfg.report_to, resume_step=start if cfg.resume else None, enabled=main
        )
        bar = tqdm(
            total=cfg.max_steps, initial=start, desc="sft", disable=not (cfg.progress and main)
        )
        if cfg.eval.every and start == 0:
            writer.log(0, self.evaluate())
        self._began = time.perf_counter()
        pace = Pace("sft", start, cfg.max_steps, enabled=cfg.progress and main)
        for step in range(start + 1, cfg.max_steps + 1):
            self.window.add(self._step(step))
            pace.tick(step)
            failing = self.guard.failing
            if step % cfg.log_every == 0 or step == cfg.max_steps or failing:
                metrics = self.window.flush()
                metrics.update(
                    lr=self._last_lr,
                    epoch=self.stream.epoch,
                    block_size=self.core.block_size,
                    elapsed_s=self._elapsed_s(),
                )
                writer.log(step, metrics)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}"
                )
            if failing:
                writer.close()
                raise self.guard.error(step, self.output_dir)
            bar.update(1)
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.max_steps):
                writer.log(step, self.evaluate())
            if cfg.save_every and step % cfg.save_every == 0:
                self.save(step)
        bar.close()
        final = self.output_dir / "final"
        with self.parallel.whole(self.model, main_only=True) as whole:
            if main:
                save_final(whole, final)
        acc.wait_for_everyone()
        writer.close()
        if main and cfg.plots:
            write_plots(self.output_dir)
        return final

    def _step(self, step: int) -> dict[str, float]:
        """Optimizer step ``step`` over ``grad_accum`` micro-batches (skipped when the loss or
        gradient is not finite); returns global sums."""
        cfg, acc = self.config, self.accelerator
        began = time.perf_counter()
        per_rank = cfg.batch_size * cfg.grad_accum
        rows = self.stream.take(per_rank * acc.num_processes)
        mine = rows[acc.process_index :: acc.num_processes]
        batches = [
            collate(
                [self.pairs[i] for i in mine[j : j + cfg.batch_size]],
                pad_id(self.core),
                self.core.block_size,
                self.core.settings.block_align,
                whole_blocks=self.objective == "block",
            ).to(acc.device)
            for j in range(0, per_rank, cfg.batch_size)
        ]
        noises = [
            sample_noise(b, self.objective, cfg.t_min, cfg.t_max, self.generator) for b in batches
        ]
        local_tokens = sum(b.num_completion_tokens for b in batches)
        total = acc.reduce(torch.tensor(float(local_tokens), device=acc.device), "sum")
        # DDP averages gradients over processes: scale so the step's loss is per token of the
        # global batch.
        normalizer = max(float(total), 1.0) / acc.num_processes
        loss = nll = masked = 0.0
        for i, (batch, noise) in enumerate(zip(batches, noises, strict=True)):
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                out = sft_loss(
                    self.model,
                    self.core.settings,
                    batch,
                    noise,
                    self.objective,
                    cfg.elbo_weight,
                    normalizer,
                )
                acc.backward(out.loss)
            loss += float(out.loss.detach())
            nll += out.nll_sum
            masked += out.masked_tokens
        grad_norm = self.parallel.clip_grad_norm(self.model, cfg.max_grad_norm)
        self._last_lr = self.optimizer.param_groups[0]["lr"]
        skipped = self.guard.skip(loss, float(grad_norm), step)
        if not skipped:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seq_tokens = sum(int(b.real.sum()) for b in batches)
        sums = torch.tensor([loss, nll, masked, seq_tokens, local_tokens], device=acc.device)
        loss, nll, masked, seq_tokens, comp_tokens = acc.reduce(sums, "sum").tolist()
        return {
            "loss": loss / acc.num_processes,
            "nll": nll,
            "masked": masked,
            "tokens": seq_tokens,
            "completion_tokens": comp_tokens,
            "grad_norm": float(grad_norm),
            "seconds": time.perf_counter() - began,
            "skipped_updates": float(skipped),
        }

    # -- evaluation and checkpoints --------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Sample the held-out split and score it (main process; the others wait)."""
        from unmask.eval.evaluate import evaluate

        cfg, acc = self.config.eval, self.accelerator
        metrics: dict[str, float] = {}
        with self.parallel.whole(self.model, self.parallel.sampling_dtype()) as model:
            if acc.is_main_process:
                with acc.autocast():
                    summary = evaluate(
                        model,
                        self.task,
                        cfg.sampler,
                        split=cfg.split,
                        limit=cfg.limit,
                        batch_size=cfg.batch_size,
                        seed=self.config.seed,
                        progress=False,
                    )
                model.train()
                metrics = eval_metrics(summary)
        acc.wait_for_everyone()
        return metrics

    def save(self, step: int) -> Path:
        """Checkpoint ``step`` (all processes call this; the main one writes)."""
        state = {
            "data": self.stream.state_dict(),
            "num_rows": len(self.pairs),
            "metrics_window": self.window.state_dict(),
            "elapsed_s": self._elapsed_s(),
            "skipped_in_a_row": self.guard.in_a_row,
        }
        return save_run_checkpoint(self, step, {"noise": self.generator}, state)

    def _resume(self) -> int:
        """Load the checkpoint named by ``config.resume``; the step to continue after."""
        acc = self.accelerator
        path = checkpoint_to_resume(self.output_dir, self.config.resume, acc.is_main_process)
        if path is None:
            return 0
        sharded = self.parallel.sharded
        state = load_checkpoint(
            path,
            None if sharded else self.core,
            None if sharded else self.optimizer,
            self.scheduler,
            generators={"noise": self.generator},
            rank=acc.process_index,
        )
        if sharded:
            self.parallel.load(path, self.core, self.optimizer)
        if state["num_rows"] != len(self.pairs):
            raise ValueError(
                f"{path} was trained on {state['num_rows']} rows, this run has "
                f"{len(self.pairs)}: resume with the same data"
            )
        self.stream.load_state_dict(state["data"])
        # Checkpoints written before these were saved resume with an empty window.
        self.window.load_state_dict(state.get("metrics_window", []))
        self._elapsed_before = float(state.get("elapsed_s", 0.0))
        self.guard.in_a_row = int(state.get("skipped_in_a_row", 0))
        logger.info("resumed from %s at step %d", path, state["step"])
        return int(state["step"])

    def _elapsed_s(self) -> float:
        """Training seconds so far, across resumes."""
        return self._elapsed_before + time.perf_counter() - self._began


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
