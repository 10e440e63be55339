"""Serving a uniform-noise model (DiffusionGemma) with the step sampler.

Such a model has no mask: each canvas of ``canvas_length`` tokens starts as random tokens,
every step samples the whole canvas, accepts its lowest-entropy positions and renoises the
rest, and the canvas's output is its last step's argmax (docs/diffusion_gemma.md). So a
request maps onto the step sampler's settings as follows:

* ``max_tokens``: ``max_new_tokens``, rounded up to whole canvases (the text is cut);
* ``temperature`` T scales the temperature schedule: ``t_min * T`` .. ``t_max * T`` (1, the
  default, is the configured schedule); 0 is refused: every step samples;
* ``seed``: the sampler's seed (a seeded request runs alone, so it repeats);
* ``diffusion.steps``: denoising steps over the completion, spread over the canvases and
  rounded up (``max_denoising_steps``: at most, the adaptive stop may end a canvas early).

Refused with a 400 naming the field, because they have no meaning here: ``top_p`` below 1 and
``top_k`` above 0 (the native sampler draws from the whole distribution), and
``diffusion.block_length`` (the canvas length is the model's), ``diffusion.steps_per_block``
(one steps setting: ``diffusion.steps``), ``diffusion.remasking`` and ``diffusion.threshold``
(nothing is masked: acceptance is the entropy bound, ``step_sampler.entropy_bound``).

A finished canvas never changes, so streamed text grows a canvas at a time; the current
canvas's argmax is a draft (``stream_canvas``) that may change until its canvas ends.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from unmask.models.diffusion_gemma import DiffusionGemma
from unmask.sampling.step_sampler import StepSampler, StepSamplerConfig, StepUpdate, special_ids
from unmask.sampling.step_trace import StepRollout
from unmask.serve.decoding import Progress
from unmask.serve.protocol import APIError, GenerationRequest

HIDDEN = -1  # not a token: a position whose canvas has not finished (or not started)
NO_MASK = (
    "Nothing is masked: each step samples the whole canvas and keeps the positions under the "
    "entropy bound (step_sampler.entropy_bound)."
)
WHOLE = "Its sampler draws from the whole distribution, as the native generate does."
WHY_REFUSED = {
    "block_length": "Its canvas length ({canvas}) is part of the model.",
    "steps_per_block": "Give diffusion.steps (denoising steps over the whole completion).",
    "remasking": NO_MASK,
    "threshold": NO_MASK,
}


class UniformDecoding:
    """A uniform-noise model decoded by :class:`StepSampler` (the module docstring says which
    request fields apply and how)."""

    def __init__(self, model: DiffusionGemma, defaults: StepSamplerConfig) -> None:
        self.model = model
        self.defaults = defaults
        self.hidden_id = HIDDEN
        self.eos_ids = tuple(special_ids(model, "eos_token_id"))
        self.default_max_tokens = defaults.max_new_tokens
        self.seed = defaults.seed

    def check(self, request: GenerationRequest) -> None:
        """Refuse the fields that have no meaning for uniform noise (before any tokenising)."""
        opts = request.diffusion
        for name, why in WHY_REFUSED.items():
            if opts is not None and getattr(opts, name) is not None:
                reason = why.format(canvas=self.model.canvas_length)
                _refuse(f"diffusion.{name}", reason)
        if request.temperature == 0:
            _refuse(
                "temperature",
                "There is no greedy decoding: a canvas starts as random tokens and every step "
                "samples. Send a temperature > 0 (1: the model's schedule) and a seed to repeat.",
            )
        if request.top_p is not None and request.top_p < 1:
            _refuse("top_p", WHOLE)
        if request.top_k is not None and request.top_k > 0:
            _refuse("top_k", WHOLE)

    def config(self, request: GenerationRequest, max_tokens: int) -> StepSamplerConfig:
        """The configured step sampler with the request's length, steps, temperature, seed."""
        base = self.defaults
        length = self.model.canvas_length
        canvases = math.ceil(max_tokens / length)
        steps = base.max_denoising_steps
        if request.diffusion is not None and request.diffusion.steps is not None:
            steps = math.ceil(request.diffusion.steps / canvases)
        scale = 1.0 if request.temperature is None else request.temperature
        return dataclasses.replace(
            base,
            max_new_tokens=canvases * length,
            max_denoising_steps=steps,
            t_min=base.t_min * scale,
            t_max=base.t_max * scale,
            seed=request.seed,
        )

    def span(self, config: StepSamplerConfig) -> tuple[int, int]:
        """Whole canvases right after the prompt."""
        return config.max_new_tokens, self.model.canvas_length

    def random_draws(self, config: StepSamplerConfig) -> bool:
        """Always: the first canvas is random and every step samples."""
        return True

    def generate(
        self,
        config: StepSamplerConfig,
        rows: Sequence[Sequence[int]],
        seed: int,
        on_step: Callable[[Progress], None],
    ) -> StepRollout:
        """:class:`StepSampler` over the rows; after each step, the finished canvases are
        final and the current canvas's argmax is the draft."""
        total = config.max_new_tokens

        def view(step: StepUpdate) -> None:
            done = step.outputs
            batch, length = step.argmax.shape
            hidden = done.new_full((batch, total - done.shape[1]), HIDDEN)
            final = torch.cat([done, hidden], dim=1)
            draft = torch.cat([done, step.argmax, hidden[:, length:]], dim=1)
            on_step(Progress(step.nfe, step.block, final, draft))

        return StepSampler(config).generate(self.model, rows, seed=seed, on_step=view)


def _refuse(param: str, why: str) -> None:
    raise APIError(400, f"{param} does not apply to this uniform-noise model. {why}", param=param)
