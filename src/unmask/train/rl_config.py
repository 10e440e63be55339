"""The settings of ``unmask rl`` (:class:`RLConfig`) and what a run settles from them and the
objective at start (:class:`ObjectiveSettings`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from unmask.objectives import LOSS_TYPES, OBJECTIVES, Capabilities, check_options
from unmask.objectives.advantages import SCALE_REWARDS
from unmask.objectives.value import ValueConfig
from unmask.sampling.sampler import SamplerConfig
from unmask.sampling.step_sampler import StepSamplerConfig
from unmask.train.curriculum import CurriculumStage, check_curriculum
from unmask.train.run_config import RunConfig


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
class RLConfig(RunConfig):
    """``unmask rl``: every field, with TRL's names where they mean the same.

    A step samples ``num_prompts`` prompts over all processes (each holds whole groups: a
    1-process and an N-process run are the same run, :mod:`unmask.train.global_batch`),
    ``num_generations`` completions each.
    ``num_iterations``, ``scale_rewards``, ``loss_type`` and ``importance_sampling_level``
    default (null) to the objective's own (:func:`objective_settings`); ``objective_options``
    are checked here, before any model loads.
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

    output_dir: str = "runs/rl"
    data: RLData = field(default_factory=RLData)
    curriculum: list[CurriculumStage] = field(default_factory=list)
    objective: str = "tracerl"
    objective_options: dict[str, Any] = field(default_factory=dict)
    num_prompts: int = 8
    num_generations: int = 8
    num_iterations: int | None = None
    micro_batch_size: int = 64
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str | None = None
    importance_sampling_level: Literal["token", "sequence"] | None = None
    scale_rewards: str | None = None
    drop_zero_std_groups: bool = False
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(temperature=1.0))
    step_sampler: StepSamplerConfig = field(default_factory=StepSamplerConfig)
    eval: RLEval = field(default_factory=RLEval)
    value_model: ValueConfig = field(default_factory=ValueConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_prompts", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_iterations is not None and self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1 or null, got {self.num_iterations}")
        check_options(self.objective, self.objective_options)
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2 (advantages are relative to the group), "
                f"got {self.num_generations}"
            )
        if self.loss_type is not None and self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type must be one of {LOSS_TYPES} or null, got {self.loss_type!r}"
            )
        if self.scale_rewards is not None and self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(
                f"scale_rewards must be one of {SCALE_REWARDS} or null, got {self.scale_rewards!r}"
            )
        if self.sampler.temperature <= 0:
            raise ValueError(
                "sampler.temperature must be > 0 for RL: greedy rollouts have no log-probs "
                "and a group of identical completions has no advantage"
            )
        if self.beta < 0 or self.epsilon <= 0:
            raise ValueError("beta must be >= 0 and epsilon > 0")
        check_curriculum(self.curriculum)
        if self.value_model.enabled:
            traced = sorted(n for n, cls in OBJECTIVES.items() if cls.scores_trace_states)
            if self.objective not in traced:
                raise ValueError(
                    f"value_model needs an objective that scores tokens in their trace state "
                    f"({', '.join(traced)}), got {self.objective!r}"
                )
            if self.importance_sampling_level == "sequence":
                raise ValueError(
                    "value_model gives token advantages: importance_sampling_level must be "
                    "token (or null)"
                )


@dataclass(frozen=True)
class ObjectiveSettings:
    """The optimisation settings a run uses: the config's, or where it leaves one null, the
    objective's own recommendation (its :class:`~unmask.objectives.Capabilities`)."""

    num_iterations: int
    scale_rewards: str
    loss_type: str
    importance_sampling_level: Literal["token", "sequence"]


def objective_settings(config: RLConfig, objective: type[Capabilities]) -> ObjectiveSettings:
    """Settle ``config``'s null settings from the ``objective`` class, once at trainer start."""
    return ObjectiveSettings(
        num_iterations=config.num_iterations or objective.num_iterations,
        scale_rewards=config.scale_rewards or objective.scale_rewards,
        loss_type=config.loss_type or objective.loss_type,
        importance_sampling_level=(
            config.importance_sampling_level or objective.importance_sampling_level
        ),
    )
