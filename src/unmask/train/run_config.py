"""The settings every training run has, whatever it trains: where it writes, how it optimises,
checkpoints, stops and reports. :class:`~unmask.train.sft.SFTConfig` and
:class:`~unmask.train.rl_config.RLConfig` extend it (redeclaring a field where their default
differs), so the run skeleton (:mod:`unmask.train.run`) reads one set of names, checked once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from unmask.models.lora import LoRAConfig
from unmask.train.sharding import FSDPConfig


@dataclass
class RunConfig:
    """``model`` to start from (preset, folder or hub name); ``output_dir`` (metrics,
    checkpoints, ``final/``); ``resume`` (``latest`` or a checkpoint folder); ``block_size``
    trains at another block size than the model's own. AdamW with warmup then cosine decay.
    ``mixed_precision: auto`` is bf16 on CUDA and fp32 on CPU; ``cpu_threads`` null is 1 for
    models under 5M parameters on CPU. An update with a non-finite loss or gradient norm is
    skipped; ``max_bad_steps`` of them in a row stop the run. ``max_time_s`` stops it early,
    saving the final model."""

    model: str = "micro-block"
    output_dir: str = "runs/run"
    resume: str | None = None
    seed: int = 0
    block_size: int | None = None
    max_steps: int = 100
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    cpu: bool = False
    lora: LoRAConfig | None = None
    gradient_checkpointing: bool = False
    cpu_threads: int | None = None
    save_every: int = 0  # 0: no intermediate checkpoints
    keep_last: int = 2
    max_bad_steps: int = 3
    max_time_s: float | None = None
    log_every: int = 1
    report_to: list[str] = field(default_factory=list)
    progress: bool = True
    plots: bool = True  # PNGs of the metrics in OUTPUT_DIR/plots at the end
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)

    def __post_init__(self) -> None:
        for name in ("max_steps", "keep_last", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1 or null, got {self.block_size}")
        if len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas must be two numbers, got {self.adam_betas}")
        if self.max_time_s is not None and self.max_time_s < 0:
            raise ValueError(f"max_time_s must be >= 0 or null, got {self.max_time_s}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1 or null, got {self.cpu_threads}")
