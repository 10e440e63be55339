"""The probability that a denoising step chose the positions it chose (the sampler's rule).

Under ``low_confidence`` and ``threshold`` remasking the positions committed at a step depend
on the tokens drawn there: a position is committed because its draw scored high. So the
probability of a step is not just the product of the committed tokens' probabilities; every
masked position left uncommitted contributes the probability that its own draw scored low
enough to be left (docs/objectives.md, "Exact selection"; derivation in selection.md of the
references). With candidates M, committed set S with tokens a_S, sampling distribution q
(mask token excluded, temperature, top-k, top-p) and untempered distribution p (which the
sampler scores confidence with), the step's probability is

    P(S, a_S) = prod_{i in S} q_i(a_i) * prod_{j in M \\ S} F_j,

- ``low_confidence``: with i* the lowest-ranked member of S and c* = p_{i*}(a_{i*}),
  F_j = q_j({x : p_j(x) < c*}) + [j > i*] q_j({x : p_j(x) = c*}) (ties rank the lower
  position first, as the sampler's stable sort does);
- ``threshold`` tau: when S's best score clears tau, F_j = q_j({x : p_j(x) < tau}); when
  nothing cleared it the sampler committed its top-ranked draw alone, the case above.

:func:`unchosen_logprob` gives ``sum_{j in M \\ S} log F_j``; the committed tokens' part is
the objectives' usual token log-probs. The set of tokens counted in F_j is a step function of
the parameters, so the gradient flows through the q mass of the counted tokens only. It lives
with the sampler because it describes the sampler's rule: the sampler records it per step
(for AGRPO's old log-probs) and the trace objectives recompute it
(:mod:`unmask.objectives.selection`).
"""

from __future__ import annotations

import torch

from unmask.sampling.remasking import sampling_logits

TOKEN_DEPENDENT = ("low_confidence", "threshold")  # rules whose choice depends on the draws


def unchosen_logprob(
    logits: torch.Tensor,
    candidates: torch.Tensor,
    chosen: torch.Tensor,
    tokens: torch.Tensor,
    *,
    remasking: str,
    threshold: float | None,
    mask_token_id: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """``[N]``: per row, the log-probability that every candidate left uncommitted drew a
    token that ranked below the committed ones (0 for rules that do not look at the draws).

    ``logits`` ``[N, L, V]`` are the model's raw logits over a step's columns; ``candidates``
    and ``chosen`` ``[N, L]`` are the positions masked before the step and committed by it;
    ``tokens`` ``[N, L]`` the committed tokens (read where ``chosen``).
    """
    if remasking not in TOKEN_DEPENDENT or temperature <= 0:
        return logits.new_zeros(logits.shape[0], dtype=torch.float32)
    logits = logits.float().clone()
    logits[..., mask_token_id] = float("-inf")
    q = sampling_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    with torch.no_grad():
        counted = _counted(logits.softmax(dim=-1), candidates, chosen, tokens, remasking, threshold)
    left = candidates & ~chosen
    mass = (q * counted).sum(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(left, mass.log(), torch.zeros_like(mass)).sum(dim=-1)


def _counted(
    p: torch.Tensor,
    candidates: torch.Tensor,
    chosen: torch.Tensor,
    tokens: torch.Tensor,
    remasking: str,
    threshold: float | None,
) -> torch.Tensor:
    """Bool ``[N, L, V]``: the tokens whose draw at each position would have left it
    uncommitted, given what the step committed."""
    score = p.gather(-1, tokens.clamp_min(0)[..., None])[..., 0]
    score = score.masked_fill(~chosen, float("inf"))
    # The lowest-ranked committed position: the lowest score, the highest index among ties.
    positions = torch.arange(score.shape[-1], device=score.device)
    key = torch.stack(torch.broadcast_tensors(score, -positions.to(score.dtype)), dim=-1)
    lowest = _lexicographic_argmin(key)
    bar = score.gather(-1, lowest[:, None])  # c*, [N, 1]
    after = positions[None, :] > lowest[:, None]  # [N, L]: j > i*
    counted = (p < bar[..., None]) | ((p == bar[..., None]) & after[..., None])
    if remasking == "threshold":
        assert threshold is not None
        cleared = (bar >= threshold)[..., None]  # every committed score is >= c*
        counted = torch.where(cleared, p < threshold, counted)
    return counted & (candidates & ~chosen)[..., None]


def _lexicographic_argmin(key: torch.Tensor) -> torch.Tensor:
    """Index of the smallest ``key[..., 0]``, ties broken by the smallest ``key[..., 1]``."""
    first = key[..., 0]
    best = first.min(dim=-1, keepdim=True).values
    second = key[..., 1].masked_fill(first != best, float("inf"))
    return second.argmin(dim=-1)
