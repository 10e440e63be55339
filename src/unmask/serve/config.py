"""``ServeConfig``: what ``unmask serve`` runs (YAML recipe plus dotted overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field

from unmask.sampling.sampler import SamplerConfig
from unmask.sampling.step_sampler import StepSamplerConfig


@dataclass
class ServeConfig:
    """An OpenAI-compatible server over one model.

    ``sampler`` gives the defaults of every request field a client leaves out (so
    ``sampler.gen_length`` is the default ``max_tokens`` and ``sampler.temperature`` the default
    temperature: 0, greedy, unlike OpenAI's 1); ``sampler.cache`` and ``sampler.stop_at_eos``
    apply to every request, and ``sampler.seed`` seeds the server's stream of batch seeds.
    A uniform-noise model (DiffusionGemma) reads ``step_sampler`` instead, in the same roles
    (``step_sampler.max_new_tokens`` is its default ``max_tokens``; a request's temperature
    scales its ``t_min`` .. ``t_max`` schedule; see :mod:`unmask.serve.uniform`).
    """

    model: str = "tiny-block"
    served_model_name: str | None = None  # the name clients send as `model`; default: `model`
    dtype: str = "auto"
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # null: read UNMASK_API_KEY; unset there too: no key needed
    max_batch_size: int = 8  # rows (prompts x n) in one sampler call
    batch_wait_ms: float = 10.0  # how long the first waiting request waits for others
    max_queue: int = 64  # requests waiting for the sampler; one more gets 503 at once
    max_prompt_chars: int | None = None  # per prompt, before tokenising; null: 16 a position
    chat_template: str | None = None  # Jinja text or a file; default: the tokenizer's own
    mask_placeholder: str = "_"  # how still-masked tokens show in a streamed canvas
    log_level: str = "info"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    step_sampler: StepSamplerConfig = field(default_factory=StepSamplerConfig)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be >= 1, got {self.max_prompt_chars}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.served_model_name == "":
            raise ValueError("served_model_name must not be empty (null: the model's name)")

    @property
    def model_name(self) -> str:
        """The name clients use for the model: ``served_model_name`` or the model path."""
        return self.served_model_name or self.model
