"""The clipped policy loss every objective shares: ratio clipping, k3 KL, normalisation.

Per scored token, with ratio ``rho = exp(logp - old)``, advantage ``A`` and view weight ``w``::

    l = -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A) + beta k3
    k3 = exp(ref - logp) - (ref - logp) - 1          (Schulman's estimator of KL(pi || ref))

An objective's weights make ``S_b = sum over rollout b's scored tokens of w l`` an unbiased
estimate of a sum over the completion's tokens, so one normalisation rule serves every method:
``loss = sum_b S_b / D_b`` with the divisors of :func:`normalizers` (``|o_b|`` = completion
tokens of rollout b including its EOS, ``B`` = rollouts, ``G`` = completion window):

============  =============================  ============================================
loss_type     ``D_b``                        meaning
============  =============================  ============================================
``grpo``      ``B |o_b|``                    per sequence: token mean, then mean over rollouts
``dapo``      ``sum_b |o_b|``                per token over the batch (or ``num_tokens``)
``dr_grpo``   ``B G``                        constant length (Dr. GRPO; TraceRL's ``/L1``)
``steps``     ``B n_b``                      per denoising step (AGRPO): ``n_b`` steps that
                                             unmask completion tokens
============  =============================  ============================================

Losses of micro-batches add up: call :func:`policy_loss` on each micro-batch of views
(:class:`LossInputs`) with the divisors of the whole rollout batch and sum (no division by
accumulation steps).

Over several processes every count (``B``, ``sum_b |o_b|``) is the global one, and each
divisor is divided by the number of processes, which average their gradients
(:func:`global_normalizers`): a rollout then weighs the same whichever process holds it, and
the averaged gradient equals one process's over the whole batch, however many rollouts each
process kept.

``level="sequence"`` (GSPO, ESPO) uses one ratio per rollout,
``log rho_b = sum w (logp - old) / |o_b|`` (for ``elbo`` the ELBO difference per token), clips
it, and weights rollout b's loss by ``|o_b| / D_b``; all views of a rollout must be in the same
call. Log-ratios are clamped to +-20 and tokens whose old log-prob is ``-inf`` are ignored:
only a top-k/top-p support recomputed after an update produces such values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from unmask.sampling.rollout import Rollout

LOSS_TYPES: tuple[str, ...] = ("grpo", "dapo", "dr_grpo", "steps")
LEVELS: tuple[str, ...] = ("token", "sequence")
MAX_LOG_RATIO = 20.0


@dataclass
class LossOutput:
    """The loss (with graph) and detached metrics named as TRL logs them."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def normalizers(
    rollout: Rollout,
    loss_type: str,
    kept: torch.Tensor | None = None,
    num_tokens: float | None = None,
    num_rollouts: float | None = None,
    processes: int = 1,
) -> torch.Tensor:
    """Divisor ``D_b`` of each rollout ``[B]`` (see the module table); ``inf`` for dropped ones.

    ``kept`` ``[B]`` marks the rollouts that are trained on (for example groups with reward
    spread, :func:`~unmask.objectives.advantages.group_advantages`). ``num_tokens`` and
    ``num_rollouts`` replace the batch's kept token and rollout counts (``sum_b |o_b|`` and
    ``B``: the counts over all processes); every divisor is divided by ``processes``, the
    number of processes whose gradients are averaged.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask = rollout.completion_mask.bool()
    kept = torch.ones(len(mask), dtype=torch.bool, device=mask.device) if kept is None else kept
    kept = kept.to(mask.device).bool()
    mask = mask & kept[:, None]
    lengths = mask.sum(dim=1).double()
    count = kept.sum().double() if num_rollouts is None else torch.tensor(float(num_rollouts))
    count = count.to(lengths.device)
    if loss_type == "grpo":
        divisor = count * lengths
    elif loss_type == "dapo":
        total = lengths.sum() if num_tokens is None else torch.tensor(float(num_tokens))
        divisor = total.to(lengths.device).expand_as(lengths)
    elif loss_type == "dr_grpo":
        divisor = (count * mask.shape[1]).expand_as(lengths)
    else:
        steps = rollout.steps.clamp(min=0)
        hit = torch.zeros(len(mask), int(steps.max()) + 1, device=mask.device)
        hit = hit.scatter_add(1, steps, mask.float())
        divisor = count * (hit > 0).sum(dim=1).double()
    divisor = (divisor.clamp(min=1) / processes).float()
    return torch.where(kept, divisor, torch.full_like(divisor, float("inf")))


def global_normalizers(
    accelerator: Any, rollout: Rollout, loss_type: str, kept: torch.Tensor
) -> torch.Tensor:
    """:func:`normalizers` with the kept rollouts and tokens counted over every process of
    ``accelerator`` (one all-reduce; every process must call it), for gradients averaged over
    them: a process that keeps fewer rollouts, or none, changes no other rollout's weight."""
    if accelerator.num_processes == 1:
        return normalizers(rollout, loss_type, kept)
    mask = rollout.completion_mask.bool() & kept.to(rollout.completion_mask.device)[:, None]
    local = torch.tensor([float(kept.sum()), float(mask.sum())], device=accelerator.device)
    rollouts, tokens = accelerator.reduce(local, reduction="sum").tolist()
    return normalizers(rollout, loss_type, kept, tokens, rollouts, accelerator.num_processes)


@dataclass(frozen=True)
class ClipConfig:
    """How the surrogate is clipped and regularised (TRL's names): the ratio is clipped to
    ``[1 - epsilon, 1 + epsilon_high]`` (``epsilon_high`` None: symmetric), ``beta`` weighs the
    k3 KL to the reference, ``level`` is ``token`` or ``sequence`` (one ratio per rollout)."""

    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    level: str = "token"


@dataclass
class LossInputs:
    """One micro-batch of views, as :func:`policy_loss` reads it.

    ``logprobs`` (with graph), ``old_logprobs``, ``ref_logprobs``, ``scored``, ``weights``,
    ``entropy`` are ``[N, W]`` view tensors (:class:`~unmask.objectives.base.ViewBatch`);
    ``advantages`` is ``[B]`` per rollout or ``[N, W]`` per token (token level only);
    ``rollout_index`` ``[N]`` the rollout of each view; ``divisors`` ``[B]`` from
    :func:`normalizers`; ``lengths`` ``[B]`` completion lengths (sequence level); ``entropy``
    only feeds a metric.
    """

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    scored: torch.Tensor
    weights: torch.Tensor
    rollout_index: torch.Tensor
    divisors: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def policy_loss(inputs: LossInputs, clip: ClipConfig | None = None) -> LossOutput:
    """Clipped surrogate (+ ``beta`` k3 KL) of a micro-batch of views (see the module doc)."""
    clip = clip or ClipConfig()
    logprobs, old_logprobs, advantages = inputs.logprobs, inputs.old_logprobs, inputs.advantages
    scored, weights, rollout_index = inputs.scored, inputs.weights, inputs.rollout_index
    divisors, ref_logprobs = inputs.divisors, inputs.ref_logprobs
    lengths, entropy = inputs.lengths, inputs.entropy
    epsilon, epsilon_high, beta, level = clip.epsilon, clip.epsilon_high, clip.beta, clip.level
    if level not in LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {LEVELS}, got {level!r}")
    high = epsilon if epsilon_high is None else epsilon_high
    mask = scored & torch.isfinite(old_logprobs)
    log_ratio = _clamped_difference(logprobs, old_logprobs, mask)
    ref_delta = None
    if beta != 0.0 and ref_logprobs is not None:
        ref_delta = _clamped_difference(ref_logprobs, logprobs, mask)
    zero = torch.zeros((), device=logprobs.device)
    metrics: dict[str, torch.Tensor] = {}
    if level == "token":
        if advantages.dim() == 1:
            advantages = advantages[rollout_index][:, None].expand_as(logprobs)
        ratio = torch.exp(log_ratio)
        per_token = -_surrogate(ratio, advantages, epsilon, high)
        if ref_delta is not None:
            kl = _k3(ref_delta)
            per_token = per_token + beta * kl
            metrics["kl"] = _mean(kl, mask)
        scale = torch.where(mask, weights / divisors[rollout_index][:, None], zero)
        loss = (per_token * scale).sum()
        counted = mask
    else:
        if advantages.dim() != 1 or lengths is None:
            raise ValueError("sequence-level ratios need per-rollout advantages and lengths")
        length = lengths.to(logprobs.device).float().clamp(min=1)
        ratio = torch.exp(_per_rollout(weights * log_ratio, rollout_index, len(divisors)) / length)
        advantages = advantages.to(logprobs.device)
        per_rollout = -_surrogate(ratio, advantages, epsilon, high)
        counted = _per_rollout(mask.float(), rollout_index, len(divisors)) > 0
        if ref_delta is not None:
            kl = _k3(_per_rollout(weights * ref_delta, rollout_index, len(divisors)) / length)
            per_rollout = per_rollout + beta * kl
            metrics["kl"] = _mean(kl, counted)
        loss = (per_rollout * torch.where(counted, length / divisors, zero)).sum()
    low_clip = (ratio < 1 - epsilon) & (advantages < 0)
    high_clip = (ratio > 1 + high) & (advantages > 0)
    metrics["clip_ratio/low_mean"] = _mean(low_clip.float(), counted)
    metrics["clip_ratio/high_mean"] = _mean(high_clip.float(), counted)
    metrics["clip_ratio/region_mean"] = _mean((low_clip | high_clip).float(), counted)
    if entropy is not None:
        metrics["entropy"] = _mean(entropy, scored)
    return LossOutput(loss, metrics)


def _clamped_difference(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``a - b`` where ``mask`` (0 elsewhere), clamped so infinite log-probs stay finite."""
    diff = torch.where(mask, a - b, torch.zeros((), device=a.device))
    return diff.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


def _k3(delta: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of ``KL(pi || ref)`` from ``delta = log ref - log pi``; >= 0."""
    return torch.exp(delta) - delta - 1


def _surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, low: float, high: float
) -> torch.Tensor:
    return torch.minimum(ratio * advantages, ratio.clamp(1 - low, 1 + high) * advantages)


def _per_rollout(values: torch.Tensor, rollout_index: torch.Tensor, num: int) -> torch.Tensor:
    """Sum of ``[N, W]`` view values per rollout, ``[num]``."""
    out = torch.zeros(num, dtype=values.dtype, device=values.device)
    return out.index_add(0, rollout_index, values.sum(dim=1))


def _mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    values = torch.where(mask, values.detach(), torch.zeros((), device=values.device))
    return values.sum() / mask.sum().clamp(min=1)
