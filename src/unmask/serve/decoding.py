"""How a request is decoded, per kind of model: the part of the server that differs by noise.

The engine (batching, cancellation, text) is the same for every model; what a request's
fields mean, which sampler runs and what a denoising step shows differ between a mask
predictor (``noise = "mask"``: :class:`MaskedDecoding`, :class:`Sampler`) and a uniform-noise
model (``noise = "uniform"``: :class:`unmask.serve.uniform.UniformDecoding`, the step
sampler). Both give the engine the same :class:`Progress` after every step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from unmask.models.diffusion_lm import DiffusionLM
from unmask.sampling.rollout import Rollout
from unmask.sampling.sampler import Sampler, SamplerConfig, StepView
from unmask.serve.protocol import DiffusionOptions, GenerationRequest


@dataclass
class Progress:
    """A batch's rows after one denoising step, for streaming.

    ``final`` ``[B, gen]``: the tokens at its left will not change (then ``hidden`` ids);
    ``draft`` ``[B, gen]``: what the canvas shows now (``hidden`` where nothing is shown).
    A masked model's committed tokens are final at once, so both are its canvas.
    """

    nfe: int
    block: int
    final: torch.Tensor
    draft: torch.Tensor

    def rows(self, lo: int, hi: int) -> Progress:
        """Rows ``[lo, hi)`` only (one job's share of the batch)."""
        return Progress(self.nfe, self.block, self.final[lo:hi], self.draft[lo:hi])

    def cpu(self) -> Progress:
        """The same on the CPU (for the event loop, off the sampler's device)."""
        return Progress(self.nfe, self.block, self.final.cpu(), self.draft.cpu())


class Decoding(Protocol):
    """What the engine asks of a kind of model (``unmask.serve.engine.decoding_for`` picks
    one by the model's ``noise``)."""

    hidden_id: int  # the id a Progress holds where a token is not decided yet
    eos_ids: tuple[int, ...]  # ids that end a completion
    default_max_tokens: int
    seed: int | None  # starts the server's stream of batch seeds

    def check(self, request: GenerationRequest) -> None:
        """Refuse (``APIError`` naming the field) what this kind of model cannot honour."""
        ...

    def config(self, request: GenerationRequest, max_tokens: int) -> Any:
        """The sampler config a request needs (equal configs can share a sampler call)."""
        ...

    def span(self, config: Any) -> tuple[int, int]:
        """(positions a completion takes after its prompt, block length) under ``config``."""
        ...

    def random_draws(self, config: Any) -> bool:
        """Whether sampling under ``config`` draws random numbers (a seed then matters)."""
        ...

    def generate(
        self,
        config: Any,
        rows: Sequence[Sequence[int]],
        seed: int,
        on_step: Callable[[Progress], None],
    ) -> Rollout:
        """Sample ``rows`` in one call, ``on_step`` after every denoising step."""
        ...


class MaskedDecoding:
    """A mask predictor decoded by :class:`Sampler`: every ``diffusion`` field applies."""

    def __init__(self, model: DiffusionLM, defaults: SamplerConfig) -> None:
        self.model = model
        self.defaults = defaults
        self.hidden_id = model.mask_token_id
        eos = model.tokenizer.eos_token_id if model.tokenizer is not None else None
        self.eos_ids = () if eos is None else (eos,)
        self.default_max_tokens = defaults.gen_length
        self.seed = defaults.seed

    def check(self, request: GenerationRequest) -> None:
        """Nothing to refuse: the request fields are this sampler's."""

    def config(self, request: GenerationRequest, max_tokens: int) -> SamplerConfig:
        """The defaults with the request's settings; ``max_tokens`` rounded up to blocks and
        ``diffusion.steps`` spread over the blocks."""
        base = self.defaults
        opts = request.diffusion or DiffusionOptions()
        block = opts.block_length or base.block_length or self.model.block_size
        gen_length = math.ceil(max_tokens / block) * block
        steps_per_block = base.steps_per_block
        if opts.steps is not None:
            steps_per_block = math.ceil(opts.steps / (gen_length // block))
        elif opts.steps_per_block is not None:
            steps_per_block = opts.steps_per_block
        return dataclasses.replace(
            base,
            gen_length=gen_length,
            block_length=block,
            steps_per_block=steps_per_block,
            remasking=opts.remasking or base.remasking,
            threshold=base.threshold if opts.threshold is None else opts.threshold,
            temperature=base.temperature if request.temperature is None else request.temperature,
            top_p=base.top_p if request.top_p is None else request.top_p,
            top_k=base.top_k if request.top_k is None else max(request.top_k, 0),
            return_logprobs=False,
            seed=request.seed,
        )

    def span(self, config: SamplerConfig) -> tuple[int, int]:
        """A zero-aligned batch can start its first block up to one block early (Canvas)."""
        block = config.block_length or self.model.block_size
        slack = block if self.model.settings.block_align == "zero" else 0
        return config.gen_length + slack, block

    def random_draws(self, config: SamplerConfig) -> bool:
        """Sampling above temperature 0, or random remasking."""
        return config.temperature > 0 or config.remasking == "random"

    def generate(
        self,
        config: SamplerConfig,
        rows: Sequence[Sequence[int]],
        seed: int,
        on_step: Callable[[Progress], None],
    ) -> Rollout:
        """:class:`Sampler` over the rows; each step's canvas is both final and draft."""

        def view(step: StepView) -> None:
            on_step(Progress(step.nfe, step.block, step.completion_ids, step.completion_ids))

        return Sampler(config).generate(self.model, rows, seed=seed, on_step=view)
