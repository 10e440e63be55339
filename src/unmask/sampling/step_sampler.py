"""DiffusionGemma's native sampling loop, recording the per-step trace RL needs.

The loop is ``DiffusionGemmaForBlockDiffusion.generate``'s, step for step, with the native
pieces themselves (``EntropyBoundSampler``, ``LinearTemperatureScheduleLogitsProcessor``,
``StableAndConfidentStoppingCriteria``) and the same random draws in the same order, so a seed
gives the native tokens exactly (tested): per canvas, encode the new tokens into the KV cache,
start from uniform random tokens, then per step (``N`` down to 1) run the decoder with the
previous step's logits as self-conditioning, divide the logits by ``t_min + (t_max - t_min)
step / N``, sample a full canvas, accept the lowest-entropy positions under the entropy
bound, renoise the rest uniformly, and stop early once the argmax canvas is stable and
confident. The canvas's output is the last step's argmax; a canvas holding an EOS ends its
row. Randomness comes from torch's global generator, as in the native code; ``seed`` forks it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from unmask.models.diffusion_gemma import DiffusionGemma
from unmask.sampling.sampler import encode_prompts
from unmask.sampling.step_trace import StepRollout, StepTrace


@dataclass
class StepSamplerConfig:
    """The native sampling settings (``DiffusionGemmaGenerationConfig`` names and defaults).

    The adaptive stop needs both ``stability_threshold`` and ``confidence_threshold``; set
    either to None to always run ``max_denoising_steps``.
    """

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int | None = 1
    confidence_threshold: float | None = 0.005
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"sampler.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_denoising_steps < 1:
            raise ValueError(
                f"sampler.max_denoising_steps must be >= 1, got {self.max_denoising_steps}"
            )
        if self.entropy_bound <= 0:
            raise ValueError(f"sampler.entropy_bound must be > 0, got {self.entropy_bound}")
        if not 0 < self.t_min < self.t_max:
            raise ValueError(
                f"sampler needs 0 < t_min < t_max (log-probs need a temperature > 0), got "
                f"t_min={self.t_min}, t_max={self.t_max}"
            )

    def generation_kwargs(self) -> dict[str, object]:
        """The same settings for the native ``generate``."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "max_denoising_steps": self.max_denoising_steps,
            "sampler_config": EntropyBoundSamplerConfig(entropy_bound=float(self.entropy_bound)),
            "t_min": self.t_min,
            "t_max": self.t_max,
            "stability_threshold": self.stability_threshold,
            "confidence_threshold": self.confidence_threshold,
        }


@dataclass
class StepUpdate:
    """One denoising step, for ``generate(on_step=...)``: ``argmax`` ``[B, L]`` is the
    canvas's current best guess (what the native streamer shows as the draft, it can still
    change); ``outputs`` ``[B, block * L]`` are the finished canvases before it, final (the
    rollout's ``completion_ids`` start with them), so a server can stream them as text."""

    nfe: int
    block: int
    argmax: torch.Tensor
    outputs: torch.Tensor


class StepSampler:
    """Sample a :class:`~unmask.models.diffusion_gemma.DiffusionGemma` with the trace."""

    def __init__(self, config: StepSamplerConfig | None = None) -> None:
        self.config = config or StepSamplerConfig()

    def generate(
        self,
        model: DiffusionGemma,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        seed: int | None = None,
        on_step: Callable[[StepUpdate], None] | None = None,
    ) -> StepRollout:
        """Sample after each prompt (text or token ids); prompts are left-padded."""
        encoded = encode_prompts(model, prompts)  # type: ignore[arg-type]
        pad_id = (special_ids(model, "pad_token_id") or [0])[0]
        width = max(len(p) for p in encoded)
        ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for row, p in enumerate(encoded):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = True
        seed = self.config.seed if seed is None else seed
        with _seeded(seed, model.device), torch.no_grad():
            return self._run(model, ids.to(model.device), mask.to(model.device), on_step)

    def _run(
        self,
        model: DiffusionGemma,
        prompt: torch.Tensor,
        prompt_mask: torch.Tensor,
        on_step: Callable[[StepUpdate], None] | None,
    ) -> StepRollout:
        cfg, device = self.config, prompt.device
        b, p_len = prompt.shape
        length, vocab, n = model.canvas_length, model.vocab_size, cfg.max_denoising_steps
        eos = special_ids(model, "eos_token_id")
        pad = (special_ids(model, "pad_token_id") or [None])[0]
        sampler = EntropyBoundSampler(
            EntropyBoundSamplerConfig(entropy_bound=float(cfg.entropy_bound)), length, vocab, n
        )
        schedule = LinearTemperatureScheduleLogitsProcessor(cfg.t_min, cfg.t_max, n)
        stop = None
        if cfg.stability_threshold is not None and cfg.confidence_threshold is not None:
            stop = StableAndConfidentStoppingCriteria(
                cfg.stability_threshold, float(cfg.confidence_threshold)
            )
        cache = model.new_cache()
        attention = prompt_mask
        encoder_positions = torch.arange(0, p_len, dtype=torch.int32, device=device)[None]
        new_tokens, outputs, records = prompt, [], []
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        nfe = 0
        for block in range(math.ceil(cfg.max_new_tokens / length)):
            cache = model.encode(new_tokens, attention, encoder_positions, cache)
            start = encoder_positions[0, -1] + 1
            decoder_positions = torch.arange(
                start, start + length, dtype=torch.int32, device=device
            )[None]
            decoder_mask = torch.nn.functional.pad(attention, (0, length), value=True)
            canvas = sampler.initialize_canvas(b, device)
            argmax, sc_logits, sc = canvas, None, None
            stopped = torch.zeros(b, dtype=torch.bool, device=device)
            if stop is not None:
                stop.reset()
            for cur in reversed(range(1, n + 1)):
                step = torch.tensor(cur, dtype=torch.int32, device=device)
                active = ~(stopped | finished)
                logits = model.decode(canvas, cache, decoder_positions, decoder_mask, sc)
                logits = schedule(prompt, logits, cur_step=step)
                probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
                sample = torch.multinomial(probs.view(-1, vocab), num_samples=1).view(b, length)
                new_argmax = logits.argmax(dim=-1)
                accepted_canvas = sampler.accept_canvas(canvas, sample, logits, step)
                accepted = sampler.accepted_token_mask
                renoised = sampler.renoise_canvas(accepted_canvas, step)
                logp = logits.log_softmax(dim=-1).gather(-1, sample[..., None])[..., 0]
                records.append(
                    (canvas, _zeros_or(sc, model, canvas), accepted, accepted_canvas,
                     torch.where(accepted, logp, 0.0), schedule.t_min + (schedule.t_max
                     - schedule.t_min) * (step / n), block, active)
                )  # fmt: skip
                nfe += 1
                if stop is not None:
                    if stopped.any():
                        new_argmax = torch.where(stopped[:, None], argmax, new_argmax)
                        renoised = torch.where(stopped[:, None], canvas, renoised)
                        logits = torch.where(stopped[:, None, None], sc_logits, logits)
                    stopped |= stop(new_argmax, logits)
                sc_logits = logits.to(model.dtype)
                sc = model.soft_embedding(sc_logits)
                canvas, argmax = renoised, new_argmax
                if on_step is not None:
                    on_step(StepUpdate(nfe, block, argmax.clone(), _joined(outputs, prompt)))
                if stopped.all():
                    break
            output = argmax.clone()
            if eos:
                is_eos = torch.isin(output, torch.tensor(eos, device=device))
                if pad is not None:
                    output = _pad_finished(output, is_eos, finished, pad)
                finished = finished | is_eos.any(dim=-1)
            outputs.append(output)
            if finished.all():
                break
            new_tokens = output
            attention = torch.nn.functional.pad(attention, (0, length), value=True)
            encoder_positions = decoder_positions
        return _to_rollout(prompt, prompt_mask, outputs, records, eos, nfe)


def _to_rollout(
    prompt: torch.Tensor,
    prompt_mask: torch.Tensor,
    outputs: list[torch.Tensor],
    records: list[tuple],
    eos: list[int],
    nfe: int,
) -> StepRollout:
    canvas, sc, accepted, tokens, logprobs, temperature, block, active = zip(*records, strict=True)
    device = prompt.device
    trace = StepTrace(
        canvas=torch.stack(canvas), self_conditioning=torch.stack(sc),
        accepted=torch.stack(accepted), tokens=torch.stack(tokens),
        logprobs=torch.stack(logprobs).float(), temperature=torch.stack(temperature).float(),
        block=torch.tensor(block, device=device), active=torch.stack(active),
    )  # fmt: skip
    ids = torch.cat(outputs, dim=1)
    length = outputs[0].shape[1]
    row_step = trace.active.long().cumsum(dim=0) - 1  # [S, B]: the row's own step count
    blocks = len(outputs)
    last = torch.full((blocks, ids.shape[0]), -1, dtype=torch.long, device=device)
    for k in range(blocks):
        in_block = (trace.block == k)[:, None] & trace.active
        last[k] = torch.where(in_block, row_step, -1).max(dim=0).values
    steps = last.T.repeat_interleave(length, dim=1)
    ran = steps >= 0
    is_eos = torch.isin(ids, torch.tensor(eos, dtype=ids.dtype, device=device)) & ran
    after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return StepRollout(
        prompt_ids=prompt, prompt_mask=prompt_mask, completion_ids=ids,
        completion_mask=ran & ~after_eos, steps=steps, logprobs=None, block_length=length,
        block_align="prompt", mask_token_id=-1, nfe=nfe, trace=trace,
    )  # fmt: skip


def _joined(outputs: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The canvases' outputs so far as one ``[B, n * L]`` tensor (``[B, 0]`` before any)."""
    return torch.cat(outputs, dim=1) if outputs else like.new_zeros((like.shape[0], 0))


def _pad_finished(
    output: torch.Tensor, is_eos: torch.Tensor, finished: torch.Tensor, pad: int
) -> torch.Tensor:
    """The native ``_finalize_canvas``: rows finished at an earlier canvas become padding,
    and tokens after the first EOS of this canvas too."""
    seen = is_eos.long().cumsum(dim=-1)
    after = (seen > 0) & ~((seen == 1) & is_eos)
    return output.masked_fill(after | finished[:, None], pad)


def _zeros_or(
    signal: torch.Tensor | None, model: DiffusionGemma, canvas: torch.Tensor
) -> torch.Tensor:
    if signal is not None:
        return signal
    return torch.zeros(*canvas.shape, model.hidden_size, dtype=model.dtype, device=canvas.device)


def special_ids(model: DiffusionGemma, name: str) -> list[int]:
    """A special id (or ids) from the generation config, as the native ``generate`` reads
    them; empty when it has none."""
    value = getattr(model.model.generation_config, name, None)
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's global generator (the native code's source of randomness) inside a fork,
    so the caller's random state is left as it was."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
