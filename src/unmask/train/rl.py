"""``unmask rl``: one trainer loop for every RL objective.

Each step, in one long-lived process per rank: **sample** ``num_generations`` rollouts per
prompt with the project's sampler (traces recorded, token ids kept) -> **score** them with the
task's rewards (:mod:`.scoring`) -> **advantages**, relative to the group or, with a value
model, per token (:mod:`.rl_value`) -> **optimise**: ``num_iterations`` optimizer updates of
the objective over the rollout batch (:mod:`.view_updates` for a mask predictor,
:mod:`.step_rollouts` for a uniform-noise model). The run around the steps (resume, logging,
evaluation, checkpoints that resume exactly, the time cap, the final save) is the skeleton SFT
shares (:mod:`.run`). The optimizer state lives across steps; no text is re-tokenised between
sampling and the loss.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from transformers import get_cosine_schedule_with_warmup

from unmask.models.loading import DiffusionModel
from unmask.models.lora import reference_model
from unmask.models.saving import save_model
from unmask.objectives import group_advantages
from unmask.objectives.value import load_token_reward
from unmask.sampling.rollout import Rollout
from unmask.tasks.registry import build_task
from unmask.train.common import (
    BatchStream,
    build_optimizer,
    disable_dropout,
    make_accelerator,
    pin_threads,
    training_model,
)
from unmask.train.curriculum import Curriculum
from unmask.train.distributed import Parallel, over_processes
from unmask.train.global_batch import StepGroups, check_share, gather_rollouts
from unmask.train.rl_config import RLConfig
from unmask.train.rl_value import token_advantages, value_learner
from unmask.train.run import Run
from unmask.train.scoring import rollout_metrics, score_rollouts
from unmask.train.sharding import resolve_fsdp
from unmask.train.step_rollouts import StepRollouts
from unmask.train.update import UpdateGuard, Updater
from unmask.train.view_updates import ViewUpdates


class RLTrainer(Run):
    """``RLTrainer(config).train()`` returns the final model's folder.

    ``model`` and ``task`` override ``config.model`` and ``config.data`` (for the Python API).
    One network, two handles: ``core`` is the policy being trained (unwrapped: sampling, its
    settings, saving); ``model`` is the same network as prepared for gradients (DDP-wrapped;
    under FSDP2 ``core`` itself, sharded). ``reference`` is the frozen KL reference and
    ``value`` the value model's learner, when configured.
    """

    name = "rl"

    def __init__(
        self, config: RLConfig, model: DiffusionModel | None = None, task: Any = None
    ) -> None:
        self.config = cfg = config
        self.accelerator = acc = make_accelerator(cfg.mixed_precision, cfg.cpu, "rl", True)
        check_share("num_prompts", cfg.num_prompts, acc.num_processes)
        set_seed(cfg.seed)
        model = training_model(model, cfg.model, acc.device, cfg.lora, cfg.gradient_checkpointing)
        # How this model samples and updates; it settles, once, the block length (into the
        # sampler's config), the objective and its settings (the config's or the objective's).
        self.kind = _rollout_kind(cfg, model, acc.num_processes)
        self.objective, self.settings = self.kind.objective, self.kind.settings
        self.sampler = self.kind.sampler
        disable_dropout(model)
        pin_threads(model, acc.device, cfg.cpu_threads)
        if model.tokenizer is None:
            raise ValueError("RL needs the model's tokenizer to decode completions for rewards")
        self.core = model.to(acc.device)
        self.tokenizer = model.tokenizer
        self.task = task if task is not None else build_task(cfg.data.task, cfg.data.options,
                                                             model.tokenizer)  # fmt: skip
        self.prompts = self.task.dataset(cfg.data.split)
        self.stream = BatchStream(len(self.prompts), cfg.seed)
        self.curriculum = Curriculum(cfg.curriculum, self.sampler, self.prompts,
                                     cfg.data.difficulty_field)  # fmt: skip
        self.reference = reference_model(model) if cfg.beta > 0 else None
        self.parallel = Parallel(acc, resolve_fsdp(cfg.fsdp, acc.mixed_precision))
        vcfg = cfg.value_model  # the value model copies the policy: before it is sharded
        self.value = value_learner(cfg, model, acc, self.parallel.fsdp) if vcfg.enabled else None
        self.parallel.shard(model, self.reference)
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.adam_betas)
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
        self.model, self.optimizer = self.parallel.prepare(self.core, optimizer)
        self.guard = UpdateGuard(acc, cfg.max_bad_steps)
        self.updater = Updater(acc, self.parallel, self.model, self.optimizer, self.guard,
                               cfg.max_grad_norm)  # fmt: skip
        self.token_reward = None
        if vcfg.enabled and vcfg.token_reward:
            self.token_reward = load_token_reward(vcfg.token_reward)
        self.output_dir = Path(cfg.output_dir)
        self.steps_done = 0

    # -- one step: sample -> score -> advantages -> optimise --------------------------------
    def step(self) -> dict[str, float]:
        """Sample, score, and take ``num_iterations`` optimizer steps on one rollout batch."""
        cfg, acc = self.config, self.accelerator
        began = time.perf_counter()
        step = self.steps_done + 1
        stage = self.curriculum.stage(step)
        gen_length = self.curriculum.gen_length(stage, cfg.sampler.gen_length)
        prompts, columns = self._prompts(stage)
        rollout = self._rollouts(prompts, gen_length)
        sampled = time.perf_counter()
        scores = score_rollouts(self.task, self.tokenizer, prompts, columns, rollout,
                                cfg.num_generations, self.value is not None, step)  # fmt: skip
        # Advantages over the whole step's rewards (a batch std spans every process).
        adv = group_advantages(gather_rollouts(acc, scores.rewards), cfg.num_generations,
                               self.settings.scale_rewards, cfg.drop_zero_std_groups)  # fmt: skip
        mine = self.groups().rows
        advantages, kept = adv.advantages[mine], adv.kept[mine] & scores.scored
        metrics = {**adv.metrics, **scores.metrics, **rollout_metrics(rollout)}
        metrics["gen_length"] = float(gen_length)
        if stage >= 0:
            metrics["curriculum_stage"] = float(stage)
        if self.value is not None:
            advantages, kept, value_metrics = token_advantages(
                self.value, cfg, self.token_reward, rollout, scores, advantages, kept,
                prompts, columns, step,
            )  # fmt: skip
            metrics.update(value_metrics)
        metrics.update(self._optimize(rollout, advantages, kept))
        metrics.update(
            lr=self.scheduler.get_last_lr()[0],
            sample_s=sampled - began,
            step_s=time.perf_counter() - began,
            epoch=self.stream.epoch,
        )
        return over_processes(acc, metrics)

    def groups(self) -> StepGroups:
        """This process's prompt groups of the step being taken, and their random streams."""
        cfg = self.config
        return StepGroups.share(cfg.seed, self.steps_done + 1, cfg.num_prompts,
                                cfg.num_generations, self.accelerator)  # fmt: skip

    def _prompts(self, stage: int) -> tuple[list[str], dict[str, list[Any]]]:
        """This process's share of the step's prompts (the next ``num_prompts`` of the data
        order, over all processes), each repeated ``num_generations`` times, and their data
        columns alike (whole groups stay on one process)."""
        cfg = self.config
        rows = self.curriculum.take(self.stream, cfg.num_prompts, stage)
        groups = self.groups().groups
        batch = self.prompts.select(rows[groups.start : groups.stop])
        repeat = cfg.num_generations
        columns = {c: [v for v in batch[c] for _ in range(repeat)] for c in batch.column_names}
        return columns.pop("prompt"), columns

    def _rollouts(self, prompts: list[str], gen_length: int) -> Rollout:
        self.core.eval()
        sampler = self.curriculum.samplers.get(gen_length, self.sampler)
        whole = self.parallel.whole(self.core, self.parallel.sampling_dtype())
        with whole as model, self.accelerator.autocast():
            return self.kind.sample(sampler, model, prompts, self.groups())

    def _optimize(
        self, rollout: Rollout, advantages: torch.Tensor, kept: torch.Tensor
    ) -> dict[str, float]:
        """``num_iterations`` optimizer updates on the rollouts ``kept``; ``advantages`` are
        per rollout ``[B]`` or per completion token ``[B, G]``."""
        return self.kind.optimize(self, rollout, advantages, kept)

    # -- the run skeleton's hooks ----------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        self.steps_done = step - 1
        return self.step()

    def label(self) -> str:
        """The run's name on the progress bar and in messages (with the objective)."""
        return f"rl {self.config.objective}"

    def postfix(self, logged: dict[str, float]) -> dict[str, str]:
        postfix = {"reward": f"{logged['reward']:.3f}"}
        if "kl" in logged:  # computed only with beta > 0
            postfix["kl"] = f"{logged['kl']:.3f}"
        return postfix

    def eval_options(self) -> dict[str, Any]:
        return {"step_sampler": self.config.eval.step_sampler}

    def load_extra_state(self, state: dict[str, Any], path: Path) -> None:
        if self.value is not None:
            self.value.load_state(path)

    def write_checkpoint_files(self, folder: Path) -> None:
        if self.value is not None:
            self.value.save_state(folder)

    def save_extras(self) -> None:
        if self.value is None:
            return
        with self.value.parallel.whole(self.value.model, main_only=True) as value:
            if self.accelerator.is_main_process:
                save_model(value, self.output_dir / "final_value")


def train_rl(config: RLConfig) -> Path:
    """Run RL as configured; returns the folder of the final model (``OUTPUT_DIR/final``)."""
    return RLTrainer(config).train()


def _rollout_kind(config: RLConfig, model: Any, processes: int) -> ViewUpdates | StepRollouts:
    """Per-step traces for a uniform-noise model (DiffusionGemma), views for a mask predictor."""
    if getattr(model, "noise", "mask") == "uniform":
        return StepRollouts(config, processes)
    return ViewUpdates(config, model)
