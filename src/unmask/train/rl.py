"""``unmask rl``: one trainer loop for every RL objective.

Each step, in one long-lived process per rank: take prompts -> ``num_generations`` rollouts
each with the project's sampler (traces recorded, token ids kept) -> rewards -> group
advantages -> ``num_iterations`` passes of the objective over the rollout batch, each an
optimizer step over micro-batches of views with gradient accumulation -> metrics ->
periodic held-out evaluation -> atomic checkpoints that resume exactly. The optimizer state
lives across steps; no text is re-tokenised between sampling and the loss.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from unmask.config import to_dict
from unmask.metrics import MetricsWriter
from unmask.models.diffusion_lm import DiffusionLM
from unmask.models.loading import DiffusionModel
from unmask.models.lora import LoRAConfig, has_lora, reference_model
from unmask.models.saving import save_model
from unmask.objectives import (
    LOSS_TYPES,
    Objective,
    ViewBatch,
    get_objective,
    group_advantages,
    policy_loss,
    token_logprobs,
)
from unmask.objectives.advantages import SCALE_REWARDS
from unmask.objectives.loss import ClipConfig, LossInputs, global_normalizers
from unmask.objectives.value import (
    ValueConfig,
    ValueLearner,
    ValueModel,
    load_token_reward,
    token_reward_vectors,
)
from unmask.rewards.process import check_vectors, split_rewards, trace_columns
from unmask.sampling.rollout import Rollout
from unmask.sampling.sampler import Sampler, SamplerConfig
from unmask.sampling.step_sampler import StepSamplerConfig
from unmask.tasks.base import reward_total
from unmask.tasks.registry import build_task
from unmask.train.checkpoint import load_checkpoint
from unmask.train.common import (
    BatchStream,
    UpdateGuard,
    adapt_block_size,
    build_optimizer,
    checkpoint_to_resume,
    disable_dropout,
    eval_metrics,
    make_accelerator,
    notice,
    on_any_process,
    pin_threads,
    save_final,
    save_run_checkpoint,
    training_model,
    write_plots,
)
from unmask.train.curriculum import CurriculumStage, check_curriculum, difficulty_rows, stage_at
from unmask.train.distributed import Parallel
from unmask.train.pace import Pace, time_cap_message
from unmask.train.sharding import FSDPConfig, resolve_fsdp
from unmask.train.step_rollouts import rollout_kind

logger = logging.getLogger(__name__)

VALUE_OBJECTIVES = ("tracerl", "agrpo")  # they score each token in the state it was unmasked from


@dataclass
class RLData:
    """Prompts and rewards: a task from ``unmask.tasks`` and its options.

    ``difficulty_field``: the numeric column a ``curriculum`` stage's ``difficulty`` range
    filters on (only read when a stage has one)."""

    task: str = "sudoku"
    options: dict[str, Any] = field(default_factory=dict)
    split: str = "train"
    difficulty_field: str = "difficulty"


@dataclass
class RLEval:
    """Held-out evaluation: at step 0, every ``every`` steps and at the end (0 = off);
    ``step_sampler`` samples a uniform-noise model (DiffusionGemma), ``sampler`` the others."""

    every: int = 0
    split: str = "test"
    limit: int | None = 128
    batch_size: int = 64
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    step_sampler: StepSamplerConfig = field(default_factory=StepSamplerConfig)


@dataclass
class RLConfig:
    """``unmask rl``: every field, with TRL's names where they mean the same.

    A step samples ``num_prompts`` prompts per process, ``num_generations`` completions each.
    ``loss_type`` and ``importance_sampling_level`` default (null) to the objective's own.
    ``beta > 0`` loads a frozen reference model (the starting weights) for the k3 KL; with
    ``lora`` the reference is the adapter-disabled base (no second copy).
    ``drop_zero_std_groups`` trains only on groups whose rewards differ.
    ``value_model`` (TraceRL's diffusion value model, docs/value.md) replaces the group
    advantage by a token advantage from a learned value (objectives scored on the trace only).
    ``block_size`` trains (and samples) at another block size than the model's own; for a
    block model ``sampler.block_length`` does the same (they must agree), and the saved model
    records the new block (docs/rl.md). ``curriculum`` schedules ``gen_length`` and the
    prompts' difficulty over the steps (:mod:`unmask.train.curriculum`).
    ``step_sampler`` replaces ``sampler`` for a uniform-noise model (DiffusionGemma, docs/
    diffusion_gemma.md), whose objectives are the per-step ``tracerl`` and ``agrpo``.
    """

    model: str = "micro-block"
    output_dir: str = "runs/rl"
    resume: str | None = None
    seed: int = 0
    data: RLData = field(default_factory=RLData)
    block_size: int | None = None
    curriculum: list[CurriculumStage] = field(default_factory=list)
    objective: str = "tracerl"
    objective_options: dict[str, Any] = field(default_factory=dict)
    max_steps: int = 100
    num_prompts: int = 8
    num_generations: int = 8
    num_iterations: int = 1
    micro_batch_size: int = 64
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str | None = None
    importance_sampling_level: Literal["token", "sequence"] | None = None
    scale_rewards: str = "group"
    drop_zero_std_groups: bool = False
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(temperature=1.0))
    step_sampler: StepSamplerConfig = field(default_factory=StepSamplerConfig)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    cpu: bool = False
    lora: LoRAConfig | None = None
    gradient_checkpointing: bool = False
    cpu_threads: int | None = None  # None: 1 for models under 5M parameters on CPU
    save_every: int = 0
    keep_last: int = 2
    max_bad_steps: int = 3  # stop after this many non-finite (skipped) updates in a row
    max_time_s: float | None = None  # stop early, saving the final model, after this long
    log_every: int = 1
    report_to: list[str] = field(default_factory=list)
    progress: bool = True
    plots: bool = True  # PNGs of the metrics in OUTPUT_DIR/plots at the end
    eval: RLEval = field(default_factory=RLEval)
    value_model: ValueConfig = field(default_factory=ValueConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)

    def __post_init__(self) -> None:
        for name in ("max_steps", "num_prompts", "num_iterations", "micro_batch_size",
                     "max_bad_steps"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2 (advantages are relative to the group), "
                f"got {self.num_generations}"
            )
        if self.loss_type is not None and self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type must be one of {LOSS_TYPES} or null, got {self.loss_type!r}"
            )
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(
                f"scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}"
            )
        if self.sampler.temperature <= 0:
            raise ValueError(
                "sampler.temperature must be > 0 for RL: greedy rollouts have no log-probs "
                "and a group of identical completions has no advantage"
            )
        if self.beta < 0 or self.epsilon <= 0:
            raise ValueError("beta must be >= 0 and epsilon > 0")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1 or null, got {self.block_size}")
        check_curriculum(self.curriculum)
        if self.value_model.enabled:
            if self.objective not in VALUE_OBJECTIVES:
                raise ValueError(
                    f"value_model needs an objective that scores tokens in their trace state "
                    f"({', '.join(VALUE_OBJECTIVES)}), got {self.objective!r}"
                )
            if self.importance_sampling_level == "sequence":
                raise ValueError(
                    "value_model gives token advantages: importance_sampling_level must be "
                    "token (or null)"
                )


class RLTrainer:
    """``RLTrainer(config).train()`` returns the final model's folder.

    ``model`` and ``task`` override ``config.model`` and ``config.data`` (for the Python API).
    """

    def __init__(
        self, config: RLConfig, model: DiffusionModel | None = None, task: Any = None
    ) -> None:
        self.config = cfg = config
        self.accelerator = acc = make_accelerator(cfg.mixed_precision, cfg.cpu, "rl", True)
        set_seed(cfg.seed)
        model = training_model(model, cfg.model, acc.device, cfg.lora, cfg.gradient_checkpointing)
        # Uniform-noise models (DiffusionGemma) sample and update through their own kind;
        # None: a mask predictor, trained by this class's sampler and view objectives.
        self.kind = rollout_kind(cfg, model, acc.num_processes)
        if self.kind is None:
            adapt_block_size(model, _training_block(cfg, model))
        disable_dropout(model)
        pin_threads(model, acc.device, cfg.cpu_threads)
        if model.tokenizer is None:
            raise ValueError("RL needs the model's tokenizer to decode completions for rewards")
        self.core = model.to(acc.device)
        self.tokenizer = model.tokenizer
        self.task = (
            task
            if task is not None
            else build_task(cfg.data.task, cfg.data.options, model.tokenizer)
        )
        self.prompts = self.task.dataset(cfg.data.split)
        self.stream = BatchStream(len(self.prompts), cfg.seed)
        if self.kind is None:
            self._set_up_masked(model)
        else:
            self.stage_rows, self.sampler = [], self.kind.sampler
        self.generator = torch.Generator().manual_seed(cfg.seed * 7919 + acc.process_index)
        self.reference = None
        if cfg.beta > 0:
            self.reference = reference_model(model)
        self.parallel = Parallel(acc, resolve_fsdp(cfg.fsdp, acc.mixed_precision))
        if self.parallel.sharded and cfg.value_model.enabled:
            raise ValueError("value_model is not sharded yet: run it under DDP (docs/scale.md)")
        self.parallel.shard(model, self.reference)
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.adam_betas)
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
        self.model, self.optimizer = self.parallel.prepare(self.core, optimizer)
        # Forwards go through the prepared (DDP) module so gradients are all-reduced; the
        # diffusion settings are read from the model itself.
        self.policy = _Prepared(self.model, self.core)
        self.value = (
            self._value_learner(model, cfg.objective_options) if cfg.value_model.enabled else None
        )
        self.token_reward = None
        if cfg.value_model.enabled and cfg.value_model.token_reward:
            self.token_reward = load_token_reward(cfg.value_model.token_reward)
        self.output_dir = Path(cfg.output_dir)
        self.steps_done = 0
        self.guard = UpdateGuard(acc, cfg.max_bad_steps)

    def _set_up_masked(self, model: DiffusionLM) -> None:
        """Curriculum rows, objective, loss settings and sampler of a mask predictor."""
        cfg = self.config
        self.stage_rows = self._curriculum_rows(cfg.sampler.block_length or model.block_size)
        options = dict(cfg.objective_options)
        if "two_stream" in _option_names(cfg.objective):
            # Block models score every block's step in one packed [clean | noisy] row.
            options.setdefault("two_stream", model.layout == "block")
        self.objective: Objective = get_objective(cfg.objective, **options)
        self.loss_type = cfg.loss_type or self.objective.loss_type
        level = cfg.importance_sampling_level or self.objective.importance_sampling_level
        self.clip = ClipConfig(cfg.epsilon, cfg.epsilon_high, cfg.beta, level)
        needs_logprobs = self.objective.old_logprobs == "sampler"
        self.sampler = Sampler(replace(cfg.sampler, return_logprobs=needs_logprobs, seed=None))

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
        bar = tqdm(total=cfg.max_steps, initial=start, desc=f"rl {cfg.objective}",
                   disable=not (cfg.progress and main))  # fmt: skip
        if cfg.eval.every and start == 0:
            writer.log(0, self.evaluate())
        pace = Pace("rl", start, cfg.max_steps, cfg.max_time_s, enabled=cfg.progress and main)
        cut = False
        for step in range(start + 1, cfg.max_steps + 1):
            self.steps_done = step - 1
            metrics = self.step()
            cut = step < cfg.max_steps and on_any_process(acc, pace.out_of_time())
            last = step == cfg.max_steps or cut
            if self.guard.failing:
                writer.log(step, metrics)
                writer.close()
                raise self.guard.error(step, self.output_dir)
            if step % cfg.log_every == 0 or last:
                writer.log(step, metrics)
            postfix = {"reward": f"{metrics['reward']:.3f}"}
            if "kl" in metrics:  # computed only with beta > 0
                postfix["kl"] = f"{metrics['kl']:.3f}"
            bar.set_postfix(postfix)
            bar.update(1)
            pace.tick(step)
            if cfg.eval.every and (step % cfg.eval.every == 0 or last):
                writer.log(step, self.evaluate())
            if cfg.save_every and step % cfg.save_every == 0:
                self.save(step)
            if last:
                break
        bar.close()
        if cut and main:
            notice(f"{time_cap_message('RL', step, cfg.max_steps)} (max_time_s={cfg.max_time_s:g})")
        final = self.output_dir / "final"
        with self.parallel.whole(self.model, main_only=True) as whole:
            if main:
                save_final(whole, final)
        if main and self.value is not None:
            save_model(self.value.core, self.output_dir / "final_value")
        acc.wait_for_everyone()
        writer.close()
        if main and cfg.plots:
            write_plots(self.output_dir)
        return final

    def step(self) -> dict[str, float]:
        """Sample, score, and take ``num_iterations`` optimizer steps on one rollout batch."""
        cfg, acc = self.config, self.accelerator
        began = time.perf_counter()
        stage = stage_at(cfg.curriculum, self.steps_done + 1)
        gen_length = cfg.sampler.gen_length
        if stage >= 0:
            gen_length = cfg.curriculum[stage].gen_length or gen_length
        rows = self._take(cfg.num_prompts * acc.num_processes, stage)
        mine = rows[acc.process_index :: acc.num_processes]
        batch = self.prompts.select(mine)
        prompts = [p for p in batch["prompt"] for _ in range(cfg.num_generations)]
        columns = {
            c: [v for v in batch[c] for _ in range(cfg.num_generations)]
            for c in batch.column_names
            if c != "prompt"
        }
        rollout = self._rollouts(prompts, gen_length)
        sampled = time.perf_counter()
        completions = rollout.completion_texts(self.tokenizer)
        trace = trace_columns(rollout)
        scores = self.task.score(prompts, completions, {**columns, **trace})
        scores = check_vectors(scores, [len(ids) for ids in trace["completion_ids"]])
        process = None  # per-token rewards: the value model's r_j; elsewhere counted as sums
        if self.value is not None:
            names, weights = self.task.reward_names, self.task.reward_weights
            totals, process = split_rewards(scores, names, weights, rollout.completion_mask)
        else:
            totals = self.task.weighted_sum(scores)
        # A sample any reward could not score (None, or the function raised) is left out.
        scored = torch.tensor([all(v[i] is not None for v in scores.values()) for i in
                               range(len(prompts))])  # fmt: skip
        rewards = _fill_unscored(totals, scored, cfg.num_generations)
        if not scored.all():
            first = int((~scored).nonzero()[0])
            logger.warning(
                "step %d: %d completion(s) could not be scored and are left out of the loss "
                "(first prompt: %r)",
                self.steps_done + 1,
                int((~scored).sum()),
                prompts[first],
            )
        adv = group_advantages(
            rewards, cfg.num_generations, cfg.scale_rewards, cfg.drop_zero_std_groups
        )
        kept = adv.kept & scored
        metrics: dict[str, float] = dict(adv.metrics)
        metrics.update(_reward_metrics(scores))
        metrics["reward_unscored"] = float((~scored).sum())
        metrics.update(_rollout_metrics(rollout))
        metrics["gen_length"] = float(gen_length)
        if stage >= 0:
            metrics["curriculum_stage"] = float(stage)
        advantages = adv.advantages
        if self.value is not None:
            outcome = {"group": adv.advantages, "raw": rewards, "none": None}
            if self.token_reward is not None:
                extra, ok = token_reward_vectors(
                    self.token_reward, prompts, completions, rollout, columns
                )
                process = extra if process is None else process + extra
                kept = kept & ok
            if cfg.value_model.reward == "none" and process is None:
                raise ValueError(
                    "value_model.reward: none leaves the value model without rewards: set "
                    "value_model.token_reward or give the task a reward function that returns "
                    "one number per completion token (docs/value.md)"
                )
            views = _trained(self.value.views(rollout), kept)
            train = (self.steps_done + 1) % cfg.value_model.train_every == 0
            advantages, value_metrics = self.value.step(
                views, rollout, outcome[cfg.value_model.reward], process, kept, train
            )
            metrics.update(value_metrics)
        metrics.update(self._optimize(rollout, advantages, kept))
        metrics.update(
            lr=self.scheduler.get_last_lr()[0],
            sample_s=sampled - began,
            step_s=time.perf_counter() - began,
            epoch=self.stream.epoch,
        )
        return _over_processes(metrics) if acc.num_processes > 1 else metrics

    def _rollouts(self, prompts: list[str], gen_length: int) -> Rollout:
        self.core.eval()
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        sampler = self.sampler
        if gen_length != self.config.sampler.gen_length:  # a curriculum stage's length
            sampler = Sampler(replace(sampler.config, gen_length=gen_length))
        whole = self.parallel.whole(self.core, self.parallel.sampling_dtype())
        with whole as model, self.accelerator.autocast():
            return sampler.generate(model, prompts, seed=seed)

    def _take(self, count: int, stage: int) -> list[int]:
        """The next ``count`` rows of the data order; a curriculum stage with a difficulty
        range skips the rows outside it (deterministic, and resumed with the data position)."""
        allowed = self.stage_rows[stage] if stage >= 0 else None
        if allowed is None:
            return self.stream.take(count)
        rows: list[int] = []
        while len(rows) < count:
            rows.extend(i for i in self.stream.take(1) if i in allowed)
        return rows

    def _curriculum_rows(self, block: int) -> list[set[int] | None]:
        """Check the curriculum against the model and data; each stage's allowed rows."""
        cfg = self.config
        for i, stage in enumerate(cfg.curriculum):
            if stage.gen_length is not None and stage.gen_length % block:
                raise ValueError(
                    f"curriculum[{i}].gen_length ({stage.gen_length}) must be a multiple of "
                    f"the block length ({block})"
                )
        if not any(stage.difficulty is not None for stage in cfg.curriculum):
            return [None] * len(cfg.curriculum)
        column = cfg.data.difficulty_field
        if column not in self.prompts.column_names:
            raise ValueError(
                f"curriculum filters on difficulty but data.difficulty_field {column!r} is not "
                f"a column of the data (columns: {', '.join(self.prompts.column_names)})"
            )
        return difficulty_rows(self.prompts[column], cfg.curriculum, column)

    def _optimize(
        self, rollout: Rollout, advantages: torch.Tensor, kept: torch.Tensor
    ) -> dict[str, float]:
        """``num_iterations`` optimizer steps; old and reference log-probs are taken first.

        ``advantages`` are per rollout ``[B]`` or per completion token ``[B, G]``."""
        if self.kind is not None:
            return self.kind.optimize(self, rollout, advantages, kept)
        cfg, acc = self.config, self.accelerator
        device = acc.device
        rollout = rollout.to(device)
        advantages, kept = advantages.to(device), kept.to(device)
        divisors = global_normalizers(acc, rollout, self.loss_type, kept)
        lengths = rollout.completion_lengths
        clip = self.clip
        sample_kw = self._sampling_kwargs()
        built = [self.objective.views(rollout, self.generator) for _ in range(cfg.num_iterations)]
        views = [_trained(v, kept) for v in built]
        olds = [self._old_logprobs(v, rollout, sample_kw) for v in views]
        refs = [self._reference_logprobs(v, sample_kw) for v in views]
        self.core.train()
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        for it, (view, old, ref) in enumerate(zip(views, olds, refs, strict=True)):
            chunks = _micro_batches(view, cfg.micro_batch_size)
            per_token = view.per_token(advantages) if advantages.dim() == 2 else None
            loss_sum = 0.0
            for _ in range(self.parallel.spare_passes(len(chunks))):
                # Zero-weight passes join the collectives of processes with more micro-batches
                # (DDP's gradient all-reduce; every FSDP2 pass), which would wait forever.
                spare = built[it].select(slice(0, 1)).to(device)
                with acc.autocast():
                    acc.backward(token_logprobs(self.policy, spare, 1, **sample_kw).sum() * 0.0)
            for i, rows in enumerate(chunks):
                chunk = view.select(rows).to(device)
                last = i == len(chunks) - 1
                sync = contextlib.nullcontext() if last else acc.no_sync(self.model)
                with sync, acc.autocast():
                    logp, entropy = token_logprobs(
                        self.policy, chunk, len(chunk), with_entropy=True, **sample_kw
                    )
                    chunk_adv = advantages if per_token is None else per_token[rows]
                    weights = chunk.weights
                    if self.objective.ratio_free:  # its weights may depend on the log-probs
                        chunk_adv, weights = self.objective.reweight(
                            chunk, logp.detach(), advantages, lengths, cfg.num_generations
                        )
                    inputs = LossInputs(
                        logp,
                        logp.detach() if old is None else old[rows].to(device),
                        chunk_adv,
                        chunk.scored,
                        weights,
                        chunk.rollout_index,
                        divisors,
                        None if ref is None else ref[rows].to(device),
                        lengths=lengths,
                        entropy=entropy,
                    )
                    out = policy_loss(inputs, clip)
                    acc.backward(out.loss)
                loss_sum += float(out.loss.detach())
                for key, value in out.metrics.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
                    counts[key] = counts.get(key, 0) + 1
            grad_norm = self.parallel.clip_grad_norm(self.model, cfg.max_grad_norm)
            if self.guard.skip(loss_sum, float(grad_norm), self.steps_done + 1):
                totals["skipped_updates"] = totals.get("skipped_updates", 0.0) + 1
                counts["skipped_updates"] = 1
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if it == 0:
                totals["loss"], counts["loss"] = loss_sum, 1
                totals["grad_norm"], counts["grad_norm"] = float(grad_norm), 1
        self.scheduler.step()
        metrics = {key: totals[key] / counts[key] for key in totals}
        metrics["clip_ratio"] = metrics.get("clip_ratio/region_mean", 0.0)
        metrics["num_views"] = float(sum(len(v) for v in views))
        return metrics

    def _sampling_kwargs(self) -> dict[str, Any]:
        if not self.objective.scores_sampling_distribution:
            return {}
        s = self.config.sampler
        return {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p}

    @torch.no_grad()
    def _old_logprobs(
        self, views: ViewBatch, rollout: Rollout, sample_kw: dict[str, Any]
    ) -> torch.Tensor | None:
        """Log-probs of the policy that sampled: stored by the sampler (AGRPO), recomputed
        with the pre-update model, or None when the first pass is on-policy (``num_iterations``
        1: the ratio is 1, so the current log-probs, detached, serve)."""
        if self.objective.old_logprobs == "sampler":
            return views.per_token(self.objective.sampler_logprobs(rollout))
        if self.config.num_iterations == 1 or self.objective.ratio_free:
            return None
        self.core.eval()
        return self._scored_in_step(self.core, views, sample_kw)

    @torch.no_grad()
    def _reference_logprobs(
        self, views: ViewBatch, sample_kw: dict[str, Any]
    ) -> torch.Tensor | None:
        if self.reference is None:
            return None
        return self._scored_in_step(self.reference, views, sample_kw)

    def _scored_in_step(
        self, model: Any, views: ViewBatch, sample_kw: dict[str, Any]
    ) -> torch.Tensor:
        """Log-probs of ``views`` without gradients; under FSDP2 with as many forwards as the
        busiest process runs (each is a collective)."""
        size = self.config.micro_batch_size
        with self.accelerator.autocast():
            out = token_logprobs(model, views, size, **sample_kw)
            if self.parallel.sharded:
                for _ in range(self.parallel.spare_passes(-(-len(views) // size))):
                    token_logprobs(model, views.select(slice(0, 1)), 1, **sample_kw)
        return out

    # -- evaluation and checkpoints --------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Sample the held-out split and score it (main process; the others wait)."""
        from unmask.eval.evaluate import evaluate

        cfg, acc = self.config.eval, self.accelerator
        metrics: dict[str, float] = {}
        with self.parallel.whole(self.model, self.parallel.sampling_dtype()) as model:
            if acc.is_main_process:
                with acc.autocast():
                    summary = evaluate(model, self.task, cfg.sampler, split=cfg.split,
                                       limit=cfg.limit, batch_size=cfg.batch_size,
                                       seed=self.config.seed, progress=False,
                                       step_sampler=cfg.step_sampler)  # fmt: skip
                metrics = eval_metrics(summary)
        acc.wait_for_everyone()
        return metrics

    def save(self, step: int) -> Path:
        """Checkpoint ``step``: weights, optimizer, scheduler, RNG and data position."""
        state = {"data": self.stream.state_dict(), "skipped_in_a_row": self.guard.in_a_row}
        value = self.value
        return save_run_checkpoint(
            self, step, {"trainer": self.generator}, state,
            (lambda model: model) if value is None else (lambda model: _WithValue(model, value)),
        )  # fmt: skip

    def _resume(self) -> int:
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
            generators={"trainer": self.generator},
            rank=acc.process_index,
        )
        if sharded:
            self.parallel.load(path, self.core, self.optimizer)
        self.stream.load_state_dict(state["data"])
        self.guard.in_a_row = int(state.get("skipped_in_a_row", 0))  # absent in older ones
        if self.value is not None:
            self.value.load_state(path)
        logger.info("resumed from %s at step %d", path, state["step"])
        return int(state["step"])

    def _value_learner(self, policy: DiffusionLM, options: dict[str, Any]) -> ValueLearner:
        """The value model (from ``value_model.init``, else a copy of the starting policy's
        backbone), its own AdamW at ``value_model.lr``, prepared like the policy."""
        cfg, acc = self.config, self.accelerator
        vcfg = cfg.value_model
        if vcfg.init is None:
            if has_lora(policy):
                raise ValueError(
                    "value_model.init must name the checkpoint to start the value model from "
                    "when the policy trains LoRA adapters (it is a full model)"
                )
            core = ValueModel.from_policy(policy)
        else:
            core = ValueModel.from_pretrained(vcfg.init, dtype="float32", device=acc.device)
            if (core.layout, core.mask_token_id) != (policy.layout, policy.mask_token_id):
                raise ValueError(
                    f"value_model.init {vcfg.init}: layout {core.layout!r} and mask token "
                    f"{core.mask_token_id} differ from the policy's ({policy.layout!r}, "
                    f"{policy.mask_token_id})"
                )
        core.set_block_size(policy.block_size)  # an adapted policy's value model follows it
        core = core.to(acc.device)
        optimizer = build_optimizer(core, vcfg.lr, cfg.weight_decay, cfg.adam_betas)
        prepared, optimizer = acc.prepare(core, optimizer)
        shrink = vcfg.shrink or int(options.get("shrink", 1))
        return ValueLearner(vcfg, prepared, core, optimizer, acc, shrink, cfg.micro_batch_size,
                            cfg.max_grad_norm)  # fmt: skip


def train_rl(config: RLConfig) -> Path:
    """Run RL as configured; returns the folder of the final model (``OUTPUT_DIR/final``)."""
    return RLTrainer(config).train()


def _training_block(config: RLConfig, model: DiffusionLM) -> int | None:
    """The block size to train at: ``block_size``; for a block model also
    ``sampler.block_length``, since its rollouts' attention block is the one the replay uses
    (so the saved model must say so)."""
    sampled = config.sampler.block_length
    if model.layout != "block" or sampled is None:
        return config.block_size
    if config.block_size is not None and config.block_size != sampled:
        raise ValueError(
            f"sampler.block_length ({sampled}) and block_size ({config.block_size}) differ: a "
            "block model samples and trains at one block size"
        )
    return sampled


def _option_names(objective: str) -> set[str]:
    from dataclasses import fields

    from unmask.objectives import OBJECTIVES

    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)}")
    return {f.name for f in fields(OBJECTIVES[objective])}  # type: ignore[arg-type]


def _trained(views: ViewBatch, kept: torch.Tensor) -> ViewBatch:
    """Only the views of rollouts that are trained on (dropped groups cost no forward)."""
    rows = kept.to(views.rollout_index.device)[views.rollout_index]
    return views if bool(rows.all()) else views.select(rows.nonzero()[:, 0])


class _Prepared:
    """The prepared (possibly DDP-wrapped) module to call, with the core model's attributes."""

    def __init__(self, prepared: torch.nn.Module, core: DiffusionLM) -> None:
        self._prepared, self._core = prepared, core

    def __call__(self, *args: Any) -> torch.Tensor:
        return self._prepared(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)


class _WithValue:
    """The policy as ``save_checkpoint`` sees it: its folder also gets the value model's files,
    so they are listed in the manifest and renamed into place atomically with the rest."""

    def __init__(self, policy: DiffusionLM, value: ValueLearner) -> None:
        self.policy, self.value = policy, value

    def save_pretrained(self, path: str | Path) -> None:
        self.policy.save_pretrained(path)
        self.value.save_state(Path(path))


def _micro_batches(views: ViewBatch, size: int) -> list[torch.Tensor]:
    """Row indices of micro-batches of about ``size`` views, never splitting a rollout's views
    (sequence-level ratios need them together)."""
    order = torch.argsort(views.rollout_index, stable=True)
    ids = views.rollout_index[order]
    chunks: list[torch.Tensor] = []
    begin = 0
    while begin < len(order):
        end = min(begin + size, len(order))
        while end < len(order) and ids[end] == ids[end - 1]:
            end += 1
        chunks.append(order[begin:end])
        begin = end
    return chunks


def _fill_unscored(
    totals: list[float | None], scored: torch.Tensor, num_generations: int
) -> torch.Tensor:
    """Rewards ``[B]`` with each unscored one replaced by the mean of its group's scored ones,
    so it gets no advantage and moves no other one's baseline."""
    rewards = torch.tensor([0.0 if t is None else float(t) for t in totals])
    rewards = torch.where(scored, rewards, torch.zeros(()))
    groups, ok = rewards.view(-1, num_generations), scored.view(-1, num_generations)
    means = (groups * ok).sum(1) / ok.sum(1).clamp(min=1)
    return torch.where(ok, groups, means[:, None].expand_as(groups)).reshape(-1)


def _over_processes(metrics: dict[str, float]) -> dict[str, float]:
    """Every process's step metrics in one: the maximum of ``max_*`` keys, the minimum of
    ``min_*`` ones and the mean of the rest (a key only some processes have: over those)."""
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


def _reward_metrics(scores: dict[str, list[float | None]]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, values in scores.items():
        present = torch.tensor([reward_total(v) for v in values if v is not None])
        if len(present):  # a per-token reward counts as its sum
            metrics[f"reward/{name}/mean"] = float(present.mean())
            metrics[f"reward/{name}/std"] = float(present.std()) if len(present) > 1 else 0.0
    return metrics


def _rollout_metrics(rollout: Rollout) -> dict[str, float]:
    lengths = rollout.completion_lengths.float()
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "nfe": float(rollout.num_steps.float().mean()),
        "tokens_per_step": float(rollout.tokens_per_step().mean()),
        "block_size": float(rollout.block_length),
    }
