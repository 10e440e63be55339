"""The model side of the server: requests become sampler jobs, batches become choices.

``Engine.prepare`` checks a request against the model (prompt length, settings) and turns it
into a ``Job``: prompt ids, ``n``, and the ``SamplerConfig`` it needs. Jobs whose configs are
equal share a sampler call (``Job.key``); ``Engine.run`` runs one such batch in the worker
thread and splits the rollout back into each job's choices.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from unmask.models.diffusion_lm import DiffusionLM
from unmask.sampling.remasking import REMASKING
from unmask.sampling.sampler import Sampler, SamplerConfig, StepView, encode_prompts
from unmask.serve.config import ServeConfig
from unmask.serve.protocol import APIError, DiffusionOptions, GenerationRequest
from unmask.serve.text import Detokenizer, Settled


@dataclass
class Choice:
    text: str
    finish_reason: str
    completion_tokens: int


@dataclass(eq=False)
class Job:
    """One request's rows (each prompt ``n`` times) and how to sample them."""

    prompts: list[list[int]]
    n: int
    config: SamplerConfig
    detok: Detokenizer
    key: tuple[Any, ...]
    emit: Callable[[StepView], None] | None = None  # set for streamed jobs (thread-safe)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


class Engine:
    """Holds the model; validates requests; runs batches (in one worker thread only)."""

    def __init__(self, model: DiffusionLM, config: ServeConfig) -> None:
        if model.tokenizer is None:
            raise ValueError(f"model {config.model!r} has no tokenizer: a server needs one")
        self.model = model
        self.tokenizer = model.tokenizer
        self.config = config
        self.max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        self._seeds = random.Random(config.sampler.seed)

    # -- request side (event loop) ---------------------------------------------------------
    def encode(
        self, prompts: Sequence[str] | Sequence[Sequence[int]], param: str
    ) -> list[list[int]]:
        """Token ids of text or id prompts; empty prompts and unknown ids are refused."""
        try:
            encoded = encode_prompts(self.model, prompts)
        except ValueError as err:
            raise APIError(400, str(err), param=param) from err
        vocab = self.model.config.vocab_size
        for i, ids in enumerate(encoded):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(
                    400,
                    f"prompt {i} has token ids outside the vocabulary ({vocab}): {bad[:5]}",
                    param=param,
                )
        return encoded

    def prepare(
        self,
        prompts: list[list[int]],
        request: GenerationRequest,
        max_tokens: int | None,
        param: str,
    ) -> Job:
        """A job for ``prompts`` under the request's settings, or an ``APIError`` naming a field."""
        base = self.config.sampler
        opts = request.diffusion or DiffusionOptions()
        max_tokens = max_tokens or base.gen_length
        block = opts.block_length or base.block_length or self.model.block_size
        gen_length = math.ceil(max_tokens / block) * block
        n = request.n or 1
        rows = len(prompts) * n
        if rows > self.config.max_batch_size:
            raise APIError(
                400,
                f"{len(prompts)} prompt(s) x n={n} is {rows} completions; this server samples "
                f"at most {self.config.max_batch_size} at once",
                param="n",
            )
        self._check_length(prompts, max_tokens, gen_length, block, param)
        if opts.remasking is not None and opts.remasking not in REMASKING:
            raise APIError(
                400,
                f"diffusion.remasking must be one of {list(REMASKING)}, got {opts.remasking!r}",
                param="diffusion.remasking",
            )
        if opts.steps is not None and opts.steps_per_block is not None:
            raise APIError(
                400,
                "give diffusion.steps or diffusion.steps_per_block, not both",
                param="diffusion.steps",
            )
        steps_per_block = base.steps_per_block
        if opts.steps is not None:
            steps_per_block = math.ceil(opts.steps / (gen_length // block))
        elif opts.steps_per_block is not None:
            steps_per_block = opts.steps_per_block
        config = dataclasses.replace(
            base,
            gen_length=gen_length,
            block_length=block,
            steps_per_block=steps_per_block,
            remasking=opts.remasking or base.remasking,
            threshold=base.threshold if opts.threshold is None else opts.threshold,
            temperature=base.temperature if request.temperature is None else request.temperature,
            top_p=base.top_p if request.top_p is None else request.top_p,
            return_logprobs=False,
            seed=request.seed,
        )
        random_draws = config.temperature > 0 or config.remasking == "random"
        # A seeded request that draws random numbers runs alone: the same seed then gives the
        # same completion whatever else is waiting. Everything else batches by settings.
        alone: object = object() if random_draws and request.seed is not None else None
        key = (dataclasses.astuple(dataclasses.replace(config, seed=None)), alone)
        detok = Detokenizer(
            self.tokenizer,
            self.model.mask_token_id,
            max_tokens,
            request.stops(),
            self.config.mask_placeholder,
        )
        return Job(prompts, n, config, detok, key)

    def _check_length(
        self, prompts: list[list[int]], max_tokens: int, gen_length: int, block: int, param: str
    ) -> None:
        if self.max_positions is None:
            return
        # A zero-aligned batch can start its first block up to one block early (see Canvas).
        slack = block if self.model.settings.block_align == "zero" else 0
        longest = max(len(p) for p in prompts)
        if longest + gen_length + slack > self.max_positions:
            raise APIError(
                400,
                f"this model's maximum context length is {self.max_positions} positions; the "
                f"prompt has {longest} tokens and max_tokens={max_tokens} needs "
                f"{gen_length + slack} more (whole blocks of {block})",
                param=param,
                code="context_length_exceeded",
            )

    # -- worker side (one thread) -----------------------------------------------------------
    def run(self, jobs: list[Job]) -> list[list[Choice]]:
        """Sample every job's rows in one sampler call; each job gets its choices back."""
        config = jobs[0].config
        seed = config.seed if len(jobs) == 1 and config.seed is not None else None
        if seed is None:
            seed = self._seeds.randrange(2**31)
        rows = [p for job in jobs for p in job.prompts for _ in range(job.n)]
        on_step = self._fan_out(jobs) if any(job.emit for job in jobs) else None
        rollout = Sampler(config).generate(self.model, rows, seed=seed, on_step=on_step)
        ids, keep = rollout.completion_ids.tolist(), rollout.completion_mask.tolist()
        results: list[list[Choice]] = []
        start = 0
        for job in jobs:
            choices = []
            for row in range(start, start + job.rows):
                kept = [t for t, k in zip(ids[row], keep[row], strict=True) if k]
                settled = job.detok.settle(kept, complete=True)
                choices.append(_choice(settled))
            results.append(choices)
            start += job.rows
        return results

    @staticmethod
    def _fan_out(jobs: list[Job]) -> Callable[[StepView], None]:
        """A step callback handing each streamed job its own rows of the canvas."""
        spans = []
        start = 0
        for job in jobs:
            spans.append((job, start, start + job.rows))
            start += job.rows

        def on_step(view: StepView) -> None:
            for job, lo, hi in spans:
                if job.emit is not None:
                    job.emit(StepView(view.nfe, view.block, view.completion_ids[lo:hi]))

        return on_step


def _choice(settled: Settled) -> Choice:
    return Choice(settled.text, settled.finish or "length", settled.tokens)
