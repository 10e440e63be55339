"""The model side of the server: requests become sampler jobs, batches become choices.

``Engine.check_fields`` refuses what the model's kind cannot honour and ``Engine.check_size``
bounds a request's prompts (count, characters), both before any tokenising; ``Engine.prepare``
checks the token ids against the model (context length) and turns the request into a ``Job``:
prompt ids, ``n``, and the sampler config it needs. Jobs whose configs are equal share a
sampler call (``Job.key``); ``Engine.run`` runs one such batch in the worker thread and splits
the rollout back into each job's choices. A cancelled job (its client left) is dropped at the
next denoising step: its rows' results are discarded, and a batch whose jobs are all
cancelled stops there. What differs by the model's ``noise`` (mask or uniform) lives in a
``Decoding`` (:mod:`unmask.serve.decoding`, :mod:`unmask.serve.uniform`).
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from unmask.models.loading import DiffusionModel
from unmask.sampling.sampler import SamplerConfig, encode_prompts
from unmask.sampling.step_sampler import StepSamplerConfig
from unmask.serve.config import ServeConfig
from unmask.serve.decoding import Decoding, MaskedDecoding, Progress
from unmask.serve.protocol import APIError, GenerationRequest
from unmask.serve.text import Detokenizer
from unmask.serve.uniform import UniformDecoding

# The default max_prompt_chars: generous characters per token (real text averages 1 to 5), so a
# prompt refused for its characters would have been refused for its tokens anyway.
CHARS_PER_POSITION = 16
UNKNOWN_POSITIONS = 65536  # for a model whose config gives no maximum


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
    config: SamplerConfig | StepSamplerConfig
    detok: Detokenizer
    key: tuple[Any, ...]
    emit: Callable[[Progress], None] | None = None  # set for streamed jobs (thread-safe)
    _cancelled: threading.Event = dataclasses.field(
        default_factory=threading.Event, init=False, repr=False
    )

    @property
    def cancelled(self) -> bool:
        """Whether the client went away (the sampler stops at its next step)."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop sampling this job (the worker thread reads it after each denoising step)."""
        self._cancelled.set()

    @property
    def rows(self) -> int:
        """Sampler rows this job needs (prompts times ``n``)."""
        return len(self.prompts) * self.n

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens over all prompts (the usage report's count)."""
        return sum(len(p) for p in self.prompts)


class _AllCancelled(Exception):
    """Every job of the running batch was cancelled: nothing left worth sampling."""


class Engine:
    """Holds the model; validates requests; runs batches (in one worker thread only)."""

    def __init__(self, model: DiffusionModel, config: ServeConfig) -> None:
        if model.tokenizer is None:
            raise ValueError(f"model {config.model!r} has no tokenizer: a server needs one")
        self.model = model
        self.tokenizer = model.tokenizer
        self.config = config
        self.decoding = decoding_for(model, config)
        text = model.config.get_text_config()  # DiffusionGemma's is a part of its config
        self.vocab_size: int = text.vocab_size
        self.max_positions: int | None = getattr(text, "max_position_embeddings", None)
        self.max_prompt_chars = config.max_prompt_chars or CHARS_PER_POSITION * (
            self.max_positions or UNKNOWN_POSITIONS
        )
        self._seeds = random.Random(self.decoding.seed)

    # -- request side (event loop, except encode) ------------------------------------------
    def check_fields(self, request: GenerationRequest) -> None:
        """Refuse fields this model's kind cannot honour (a uniform-noise model has no mask)."""
        self.decoding.check(request)

    def check_size(self, prompts: Sequence[str | Sequence[int]], n: int, param: str) -> None:
        """Refuse too many rows or too long a text before tokenising (slow on big text)."""
        self.check_rows(len(prompts), n, param)
        self.check_chars([p for p in prompts if isinstance(p, str)], param)

    def check_rows(self, prompts: int, n: int, param: str) -> None:
        """Refuse more completions than one sampler call takes (``max_batch_size``)."""
        if prompts * n > self.config.max_batch_size:
            raise APIError(
                400,
                f"{prompts} prompt(s) x n={n} is {prompts * n} completions; this server "
                f"samples at most {self.config.max_batch_size} at once",
                param="n" if n > 1 else param,
            )

    def check_chars(self, texts: Sequence[str], param: str) -> None:
        """Refuse a text longer than ``max_prompt_chars``, whatever its token count."""
        for i, text in enumerate(texts):
            if len(text) > self.max_prompt_chars:
                what = f"prompt {i}" if param == "prompt" else "the templated conversation"
                raise APIError(
                    400,
                    f"{what} has {len(text)} characters; this server tokenises at most "
                    f"{self.max_prompt_chars} (max_prompt_chars)",
                    param=param,
                    code="context_length_exceeded",
                )

    def encode(
        self, prompts: Sequence[str] | Sequence[Sequence[int]], param: str
    ) -> list[list[int]]:
        """Token ids of text or id prompts; empty prompts and unknown ids are refused.

        Slow on long text: the server calls it off the event loop.
        """
        try:
            encoded = encode_prompts(self.model, prompts)
        except ValueError as err:
            raise APIError(400, str(err), param=param) from err
        vocab = self.vocab_size
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
        max_tokens = max_tokens or self.decoding.default_max_tokens
        config = self.decoding.config(request, max_tokens)
        self._check_length(prompts, max_tokens, *self.decoding.span(config), param)
        # A seeded request that draws random numbers runs alone: the same seed then gives the
        # same completion whatever else is waiting. Everything else batches by settings.
        alone = request.seed is not None and self.decoding.random_draws(config)
        settings = dataclasses.astuple(dataclasses.replace(config, seed=None))
        key = (settings, object() if alone else None)
        detok = Detokenizer(
            self.tokenizer,
            self.decoding.hidden_id,
            max_tokens,
            request.stops(),
            self.config.mask_placeholder,
            eos_ids=self.decoding.eos_ids,
        )
        return Job(prompts, request.n or 1, config, detok, key)

    def _check_length(
        self, prompts: list[list[int]], max_tokens: int, needed: int, block: int, param: str
    ) -> None:
        if self.max_positions is None:
            return
        longest = max(len(p) for p in prompts)
        if longest + needed > self.max_positions:
            raise APIError(
                400,
                f"this model's maximum context length is {self.max_positions} positions; the "
                f"prompt has {longest} tokens and max_tokens={max_tokens} needs "
                f"{needed} more (whole blocks of {block})",
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
        try:
            rollout = self.decoding.generate(config, rows, seed, self._on_step(jobs))
        except _AllCancelled:
            return [[] for _ in jobs]
        ids, keep = rollout.completion_ids.tolist(), rollout.completion_mask.tolist()
        results: list[list[Choice]] = []
        for job, (lo, hi) in zip(jobs, _spans(jobs), strict=True):
            rows_kept = zip(ids[lo:hi], keep[lo:hi], strict=True)
            results.append([] if job.cancelled else [_choice(job, *row) for row in rows_kept])
        return results

    @staticmethod
    def _on_step(jobs: list[Job]) -> Callable[[Progress], None]:
        """After each step: stop if every job was cancelled, else stream each live job's rows.

        The sampler decodes the batch as one tensor and cannot drop rows, so a cancelled job
        that shares its batch keeps being sampled and its rows are discarded at the end.
        """
        spans = list(zip(jobs, _spans(jobs), strict=True))

        def on_step(progress: Progress) -> None:
            if all(job.cancelled for job in jobs):
                raise _AllCancelled
            for job, (lo, hi) in spans:
                if job.emit is not None and not job.cancelled:
                    job.emit(progress.rows(lo, hi))

        return on_step


def decoding_for(model: DiffusionModel, config: ServeConfig) -> Decoding:
    """The decoding of the model's kind: its ``noise`` capability, never its class name."""
    if model.noise == "uniform":
        return UniformDecoding(model, config.step_sampler)  # type: ignore[arg-type]
    return MaskedDecoding(model, config.sampler)  # type: ignore[arg-type]


def _spans(jobs: list[Job]) -> list[tuple[int, int]]:
    """Each job's rows ``[lo, hi)`` in the batch."""
    spans = []
    start = 0
    for job in jobs:
        spans.append((start, start + job.rows))
        start += job.rows
    return spans


def _choice(job: Job, ids: list[int], keep: list[bool]) -> Choice:
    settled = job.detok.settle([t for t, k in zip(ids, keep, strict=True) if k], complete=True)
    return Choice(settled.text, settled.finish or "length", settled.tokens)
