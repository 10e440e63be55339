"""SPG (sandwiched policy gradient, arXiv 2510.09541): a lower bound of the log-likelihood for
positive advantages, an upper bound for negative ones, over block-wise masks.

The paper's objective (Eq. 5) is ``J = E[1/g sum_j A_j (1[A_j >= 0] L_ELBO + 1[A_j < 0] L_neg)]``
with ``L_neg`` the evidence upper bound (Corollary 1, Eq. 7)
``L_EUBO = 1/beta sum_i log E_{t, z_t}[w(t) 1(z_t,i = m) pi(x_i | z_t)^beta]``, or its mixture
with the ELBO (Section 3.4) ``omega L_EUBO + (1 - omega) L_ELBO``: pushing up a lower bound
raises the likelihood, pushing down an upper bound lowers it, where pushing down the ELBO (what
every ELBO-only method does for negative advantages) need not.

**Block-wise masks** (Section 3.3). Each of ``mc_samples`` views per rollout picks one block
uniformly among those holding completion tokens; earlier blocks stay clean, later blocks are
fully masked (the state the semi-autoregressive sampler decodes a block in), and ``m ~ U{1..n}``
of the block's ``n`` tokens are hidden, uniformly; the hidden ones are scored with weight
``J n / (m K)`` (``J`` blocks, ``K`` views). Summed, the weighted log-probs are an unbiased
estimate of the block ELBO ``sum_j E_order[sum_{i in block j} log pi(x_i | earlier blocks, the
block's tokens revealed before i, masks after)]``, which is below the log-likelihood of the
block sampler with random unmasking order (Jensen, per block). With the same weights,
``E_i = sum_k w_k pi_ik^beta`` over the views hiding token ``i`` is unbiased for the
expectation inside the EUBO's log (the paper's ``1/t`` with ``t`` the empirical mask ratio).

**How tight the EUBO is.** By Holder, ``log p(block) <= sum_i 1/n log E[pi_i^n]``, and by the
power-mean inequality this is ``<= sum_i 1/beta log E[pi_i^beta]`` for ``beta >= n``: with
``eubo_beta`` at least the block size the EUBO is a true upper bound (tested by enumeration).
The paper's Theorem 1 adds a parameter-free constant ``C(T)`` for ``beta < n``; its smaller
``beta`` (1 to 2) is a sharpened surrogate with the same gradient form, not itself a bound.

**Gradient.** ``d/dtheta 1/beta log E_i = sum_k c_ik d log pi_ik`` with ``c_ik = w_k pi_ik^beta
/ E_i`` (the paper's confidence-aware weights, Proposition 1): the EUBO is a weighted
log-likelihood whose weights depend on the current log-probs. As in the paper's code, the sum
over the tokens the views cover is scaled to the completion length (``|o| / covered``), so the
ELBO and EUBO terms weigh alike. SPG has no importance ratio (``ratio_free``): every inner
iteration scores the current policy; ``reweight`` gives the shared loss, at ratio 1, exactly
this gradient. The native normalisation is ``dapo`` (the paper's length-weighted sum over the
batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from unmask.objectives.base import Objective, ViewBatch, uniform
from unmask.objectives.random_mask import random_subset
from unmask.objectives.replay import replay
from unmask.sampling.rollout import Rollout

NEGATIVE: tuple[str, ...] = ("elbo", "eubo", "mix")


@dataclass
class EUBO:
    """The EUBO estimate of the tokens a batch of views hides: ``value`` ``[B]`` (sum over the
    covered tokens of ``1/beta log E_i``, with graph when the log-probs have one), ``weights``
    ``[N, W]`` (its gradient weights ``c_ik``, detached; each covered token's sum to 1) and
    ``covered`` ``[B]`` (distinct completion tokens scored in some view)."""

    value: torch.Tensor
    weights: torch.Tensor
    covered: torch.Tensor


@dataclass
class SPG(Objective):
    """SPG (module doc): block-wise random masks scored as an ELBO for positive advantages
    and as an upper bound (EUBO, or its mix with the ELBO) for negative ones, ratio-free."""

    mc_samples: int = 2
    negative: Literal["elbo", "eubo", "mix"] = "mix"
    eubo_beta: float = 1.5
    mix_weight: float = 0.5
    two_stream: bool = False

    name = "spg"
    loss_type = "dapo"
    ratio_free: ClassVar[bool] = True
    num_iterations = 4  # the paper's passes per batch
    scale_rewards = "none"  # the paper's A = R - mean
    supports_two_stream = True

    def __post_init__(self) -> None:
        if self.mc_samples < 1:
            raise ValueError(f"spg.mc_samples must be >= 1, got {self.mc_samples}")
        if self.negative not in NEGATIVE:
            raise ValueError(f"spg.negative must be one of {NEGATIVE}, got {self.negative!r}")
        if self.eubo_beta < 1.0:
            raise ValueError(f"spg.eubo_beta must be >= 1 (Renyi bound), got {self.eubo_beta}")
        if not 0.0 <= self.mix_weight <= 1.0:
            raise ValueError(f"spg.mix_weight must be in [0, 1], got {self.mix_weight}")

    def views(self, rollout: Rollout, generator: torch.Generator | None = None) -> ViewBatch:
        """``mc_samples`` views per rollout: one block partly hidden, later blocks masked."""
        rp = replay(rollout)
        rows = rp.rows(self.mc_samples)
        scorable, blocks = rp.scorable[rows], rp.canvas.blocks[rows]
        # Completion tokens up to the EOS are a prefix, so their blocks are contiguous.
        big = torch.iinfo(blocks.dtype).max
        first = blocks.masked_fill(~scorable, big).min(dim=1).values
        count = blocks.masked_fill(~scorable, -1).max(dim=1).values - first + 1
        u = uniform((2, len(rows)), generator).to(blocks.device)
        block = first + (u[0] * count).long().minimum(count - 1)
        current = scorable & (blocks == block[:, None])
        n = current.sum(dim=1)
        m = 1 + (u[1] * n).long().minimum(n - 1)  # uniform on 1..n
        hidden = random_subset(current, m / n, generator)
        later = scorable & (blocks > block[:, None])
        masked = hidden | later | (rp.canvas.completion[rows] & ~scorable)
        weight = count * n / (m * self.mc_samples)
        return rp.views(rows, masked, hidden, weight, self.two_stream)

    def reweight(
        self,
        views: ViewBatch,
        logprobs: torch.Tensor,
        advantages: torch.Tensor,
        lengths: torch.Tensor,
        num_generations: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advantages ``[B]`` and weights ``[N, W]`` for which the shared loss at ratio 1
        (old log-probs = ``logprobs``, detached) has SPG's gradient: the view weights (ELBO)
        for positive advantages, the ``negative`` bound's weights for negative ones. All views
        of a rollout must be in ``views``."""
        if advantages.dim() != 1:
            raise ValueError("spg needs one advantage per rollout (no value model)")
        if self.negative == "elbo":
            return advantages, views.weights
        eubo = eubo_estimate(views, logprobs.detach(), self.eubo_beta)
        rollouts = views.rollout_index
        scale = lengths.to(eubo.covered.device).float() / eubo.covered.clamp(min=1)
        upper = eubo.weights * scale[rollouts][:, None]
        mix = 1.0 if self.negative == "eubo" else self.mix_weight
        negative = (advantages.to(rollouts.device) < 0)[rollouts][:, None] & views.scored
        weights = torch.where(negative, (1 - mix) * views.weights + mix * upper, views.weights)
        return advantages, weights


def eubo_estimate(views: ViewBatch, logprobs: torch.Tensor, beta: float) -> EUBO:
    """The EUBO of each rollout over the tokens its views hide (see the module doc):
    ``E_i = sum over views k hiding token i of weight_k * pi_ik^beta``."""
    rows, cols = views.scored.nonzero(as_tuple=True)
    rollout = views.rollout_index[rows]
    width = int(views.completion_index.max()) + 1
    token, key = torch.unique(rollout * width + views.completion_index[rows, cols],
                              return_inverse=True)  # fmt: skip
    log_terms = views.weights[rows, cols].log() + beta * logprobs[rows, cols]
    peak = torch.full((len(token),), -torch.inf, device=log_terms.device)
    peak = peak.scatter_reduce(0, key, log_terms.detach(), "amax")
    total = torch.zeros(len(token), device=log_terms.device)
    total = total.index_add(0, key, torch.exp(log_terms - peak[key]))
    log_e = peak + total.log()  # log E_i per covered token
    num = len(views.canvas.ids)
    owner = torch.div(token, width, rounding_mode="floor")
    value = torch.zeros(num, device=log_e.device).index_add(0, owner, log_e / beta)
    covered = torch.zeros(num, device=log_e.device).index_add(0, owner, torch.ones_like(log_e))
    weights = torch.zeros(views.scored.shape, device=log_e.device)
    weights[rows, cols] = torch.exp(log_terms - log_e[key]).detach()
    return EUBO(value, weights, covered)
