"""Semi-autoregressive block sampler that records the trace.

The canvas is ``[padding | prompt | gen_length masks]``, one row per prompt. Rows are
left-padded so that block 0 (see :func:`unmask.models.attention.block_origin`) starts at the
same column ``S`` in every row; block ``k`` then occupies columns ``[S + k*b, S + (k+1)*b)``
of all rows, and a batch decodes block by block in lockstep.

Each denoising step runs one forward, proposes a token for every masked position of the
current block, and commits some of them (:mod:`unmask.sampling.remasking`). The step id of
each committed token is recorded per row: that is the trace.

Caches. Every forward is "cached keys, then the query's own keys", under a 4-D mask that can
hide stale cached columns, so all caches are the same mechanism:

* ``kv`` (block layout, exact): committed blocks are written once. The first forward of block
  ``k`` also carries block ``k-1`` in its clean, final state, which writes that block's keys
  into the cache in the same pass (no extra commit forward).
* ``prefix`` (full layout, approximate, Fast-dLLM): one full forward per block; the prefix's
  keys are then frozen while the rest of the canvas is recomputed each step.
* ``dual`` (full layout, approximate): one full forward per block caches everything; later
  steps only recompute the current block, with its stale cached copy hidden.
* ``none``: every step forwards the whole canvas.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from unmask.models.diffusion_lm import DiffusionLM
from unmask.sampling.canvas import Canvas
from unmask.sampling.draws import Draws
from unmask.sampling.forwarder import Forwarder
from unmask.sampling.remasking import REMASKING, propose, scores, select
from unmask.sampling.rollout import Rollout
from unmask.sampling.selection import unchosen_logprob

logger = logging.getLogger(__name__)

CACHES: tuple[str, ...] = ("auto", "none", "kv", "prefix", "dual")


@dataclass
class SamplerConfig:
    """Sampling settings.

    ``steps_per_block`` is counted per block (default: ``block_length``, one token per step);
    LLaDA's total ``steps`` equals ``steps_per_block * gen_length / block_length``.
    ``block_length`` defaults to the model's block size. ``cache="auto"`` picks the exact
    cache of the layout: ``kv`` for block models, ``none`` for full-attention models.
    ``compile`` runs each step's forward through ``torch.compile`` (CUDA graphs on GPU).
    """

    gen_length: int = 64
    block_length: int | None = None
    steps_per_block: int | None = None
    remasking: str = "low_confidence"
    threshold: float = 0.9
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    cache: str = "auto"
    stop_at_eos: bool = True
    return_logprobs: bool = False
    seed: int | None = 0
    compile: bool = False

    def __post_init__(self) -> None:
        if self.gen_length < 1:
            raise ValueError(f"sampler.gen_length must be >= 1, got {self.gen_length}")
        if self.block_length is not None and self.block_length < 1:
            raise ValueError(f"sampler.block_length must be >= 1, got {self.block_length}")
        if self.block_length is not None and self.gen_length % self.block_length:
            raise ValueError(
                f"sampler.block_length ({self.block_length}) must divide sampler.gen_length "
                f"({self.gen_length})"
            )
        if self.steps_per_block is not None and self.steps_per_block < 1:
            raise ValueError(f"sampler.steps_per_block must be >= 1, got {self.steps_per_block}")
        if self.remasking not in REMASKING:
            raise ValueError(
                f"sampler.remasking must be one of {REMASKING}, got {self.remasking!r}"
            )
        if self.cache not in CACHES:
            raise ValueError(f"sampler.cache must be one of {CACHES}, got {self.cache!r}")
        if self.compile and self.cache in ("prefix", "dual"):
            raise ValueError(
                f"sampler.compile needs fixed shapes: use cache 'auto', 'none' or 'kv', not "
                f"{self.cache!r} (its forwards change length every block)"
            )
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"sampler.threshold must be in [0, 1], got {self.threshold}")
        if self.temperature < 0:
            raise ValueError(f"sampler.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"sampler.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampler.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class StepView:
    """The completion canvas after one denoising step (for ``generate(on_step=...)``).

    ``completion_ids`` ``[B, gen_length]`` is a copy: positions not yet unmasked hold the
    mask token. Watching these step by step shows the text appear out of order.
    """

    nfe: int  # forwards so far, this step's included
    block: int
    completion_ids: torch.Tensor


class Sampler:
    """``Sampler(config).generate(model, prompts) -> Rollout``."""

    def __init__(self, config: SamplerConfig | None = None) -> None:
        self.config = config or SamplerConfig()

    def cache_for(self, model: DiffusionLM) -> str:
        """The cache mode used for ``model``: ``auto`` is a KV cache for block models."""
        cache = self.config.cache
        if cache == "auto":
            return "kv" if model.layout == "block" else "none"
        allowed = ("none", "kv") if model.layout == "block" else ("none", "prefix", "dual")
        if cache not in allowed:
            raise ValueError(
                f"sampler.cache={cache!r} does not fit a {model.layout!r} model; use one of "
                f"{allowed}"
            )
        return cache

    @torch.inference_mode()
    def generate(
        self,
        model: DiffusionLM,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        seed: int | None = None,
        on_step: Callable[[StepView], None] | None = None,
        group_seeds: Sequence[int] | None = None,
    ) -> Rollout:
        """Decode ``gen_length`` tokens after each prompt (text, or token ids).

        ``on_step``, when given, is called after every denoising step with the canvas.
        ``seed`` (else the config's) seeds one random stream for the batch; ``group_seeds``
        instead give each equal group of consecutive rows its own (:mod:`.draws`), so a group
        samples the same tokens whatever else is in the batch (RL's groups of completions of
        one prompt, on any process).
        """
        cfg = self.config
        prompt_ids = encode_prompts(model, prompts)
        b = cfg.block_length or model.block_size
        if cfg.gen_length % b:
            raise ValueError(
                f"block length {b} (the model's block_size unless sampler.block_length is set) "
                f"must divide sampler.gen_length ({cfg.gen_length})"
            )
        if model.layout == "block" and b != model.block_size:
            logger.warning(
                "sampling a block model with block_length=%d, not its native %d",
                b,
                model.block_size,
            )
        steps_per_block = cfg.steps_per_block or b
        cache = self.cache_for(model)
        tokenizer = model.tokenizer
        pad = pad_id(model)
        eos_id = tokenizer.eos_token_id if tokenizer is not None else None
        device = model.device
        canvas = Canvas.build(
            prompt_ids,
            cfg.gen_length,
            b,
            model.settings.block_align,
            model.mask_token_id,
            pad,
            device,
        )
        max_pos = getattr(model.config, "max_position_embeddings", None)
        longest = int(canvas.positions.max()) + 1
        if max_pos is not None and longest > max_pos:
            raise ValueError(
                f"prompt plus gen_length needs {longest} positions; the model has {max_pos}"
            )
        batch, width = canvas.ids.shape
        draws = Draws(batch, device, cfg.seed if seed is None else seed, group_seeds)
        steps = torch.full((batch, width), -1, dtype=torch.long, device=device)
        logprobs = torch.zeros((batch, width), device=device)
        selection = torch.zeros((batch, cfg.gen_length), device=device)  # per row step
        row_step = torch.zeros(batch, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        runner = Forwarder(model, canvas, cache, b, cfg.compile)
        threshold = cfg.threshold if cfg.remasking == "threshold" else None
        nfe = 0
        index = canvas.completion_start[:, None] + torch.arange(cfg.gen_length, device=device)

        for k in range((width - canvas.start) // b):
            a0, a1 = canvas.start + k * b, canvas.start + (k + 1) * b
            active = canvas.completion[:, a0:a1] & ~finished[:, None]
            n_masked = ((canvas.ids[:, a0:a1] == model.mask_token_id) & active).sum(dim=1)
            step = 0
            while True:
                masked = (canvas.ids[:, a0:a1] == model.mask_token_id) & active
                if not masked.any():
                    break
                logits = runner.block_logits(a0, a1, step)
                busy = masked.any(dim=1)
                noise = draws.exponential(logits.shape, busy) if cfg.temperature > 0 else None
                proposal = propose(
                    logits, model.mask_token_id, cfg.temperature, cfg.top_k, cfg.top_p, noise
                )
                uniform = draws.uniform(masked.shape, busy) if cfg.remasking == "random" else None
                score = scores(proposal, cfg.remasking, uniform)
                quota = None if threshold is not None else _quota(n_masked, steps_per_block, step)
                chosen = select(score, masked, quota, threshold)
                block_ids = canvas.ids[:, a0:a1]
                block_ids[chosen] = proposal.tokens[chosen]
                steps[:, a0:a1][chosen] = row_step[:, None].expand(-1, b)[chosen]
                logprobs[:, a0:a1][chosen] = proposal.logprobs[chosen]
                if cfg.return_logprobs:  # the step's selection factor, at each row's step
                    left = unchosen_logprob(
                        logits, masked, chosen, proposal.tokens, remasking=cfg.remasking,
                        threshold=threshold, mask_token_id=model.mask_token_id,
                        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                    )  # fmt: skip
                    went = chosen.any(dim=1)
                    selection[went, row_step[went]] = left[went]
                row_step += chosen.any(dim=1)
                nfe += 1
                step += 1
                if on_step is not None:
                    on_step(StepView(nfe, k, canvas.ids.gather(1, index)))
            ended = canvas.completion_start + cfg.gen_length <= a1
            if cfg.stop_at_eos and eos_id is not None:
                ended |= ((canvas.ids[:, a0:a1] == eos_id) & canvas.completion[:, a0:a1]).any(1)
            finished |= ended
            if finished.all():
                break

        return _to_rollout(
            canvas, steps, logprobs, selection, prompt_ids, cfg, b, model, pad, eos_id, nfe
        )


def _quota(n_masked: torch.Tensor, steps: int, step: int) -> torch.Tensor:
    """Tokens to commit at ``step``: masks split evenly over the block's steps, front-loaded."""
    base = torch.div(n_masked, steps, rounding_mode="floor")
    return base + (step < n_masked % steps).long()


def pad_id(model: DiffusionLM) -> int:
    """The id that fills padding: the tokenizer's pad token, else its EOS, else the config's."""
    tok = model.tokenizer
    for candidate in (
        getattr(tok, "pad_token_id", None),
        getattr(tok, "eos_token_id", None),
        getattr(model.config, "pad_token_id", None),
    ):
        if candidate is not None:
            return int(candidate)
    return 0


def encode_prompts(
    model: DiffusionLM, prompts: Sequence[str] | Sequence[Sequence[int]]
) -> list[list[int]]:
    """Token ids of each prompt; text needs the model's tokenizer. Empty prompts are refused."""
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    encoded: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if model.tokenizer is None:
                raise ValueError("text prompts need a tokenizer: the model was loaded without one")
            ids = model.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        encoded.append(list(ids))
    return encoded


def _to_rollout(
    canvas: Canvas,
    steps: torch.Tensor,
    logprobs: torch.Tensor,
    selection: torch.Tensor,
    prompt_ids: list[list[int]],
    cfg: SamplerConfig,
    block_length: int,
    model: DiffusionLM,
    pad_id: int,
    eos_id: int | None,
    nfe: int,
) -> Rollout:
    device = canvas.ids.device
    index = canvas.completion_start[:, None] + torch.arange(cfg.gen_length, device=device)
    ids = canvas.ids.gather(1, index)
    step_ids = steps.gather(1, index)
    decoded = step_ids >= 0
    ids = ids.masked_fill(~decoded, pad_id)
    is_eos = (ids == eos_id) & decoded if eos_id is not None else torch.zeros_like(decoded)
    after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    width = max(len(p) for p in prompt_ids)
    prompt = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long, device=device)
    prompt_mask = torch.zeros_like(prompt, dtype=torch.bool)
    for row, p in enumerate(prompt_ids):
        prompt[row, width - len(p) :] = torch.tensor(p, device=device)
        prompt_mask[row, width - len(p) :] = True
    return Rollout(
        prompt_ids=prompt,
        prompt_mask=prompt_mask,
        completion_ids=ids,
        completion_mask=decoded & ~after_eos,
        steps=step_ids,
        logprobs=logprobs.gather(1, index) if cfg.return_logprobs else None,
        block_length=block_length,
        block_align=model.settings.block_align,
        mask_token_id=model.mask_token_id,
        nfe=nfe,
        remasking=cfg.remasking,
        threshold=cfg.threshold if cfg.remasking == "threshold" else None,
        selection_logprobs=selection if cfg.return_logprobs else None,
    )
