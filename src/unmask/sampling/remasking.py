"""Token proposals and the transfer rule: which masked positions a step unmasks.

Each denoising step draws a candidate token for every masked position of the current block
(:func:`propose`), scores the candidates, and commits some of them (:func:`select`). Nothing
committed is ever masked again: "remasking" names the rule choosing what to keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REMASKING: tuple[str, ...] = ("low_confidence", "threshold", "random", "margin", "entropy")


@dataclass
class Proposal:
    """Candidate tokens for a block, ``[B, L]`` each."""

    tokens: torch.Tensor
    logprobs: torch.Tensor  # under the processed sampling distribution
    probs: torch.Tensor  # full untempered distribution ``[B, L, V]``, used for scores


def sampling_logits(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Logits of the distribution tokens are drawn from: temperature, then top-k, then top-p."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass before it already reaches top_p: the top token stays.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def propose(
    logits: torch.Tensor,
    mask_token_id: int,
    temperature: float,
    top_k: int,
    top_p: float,
    noise: torch.Tensor | None,
) -> Proposal:
    """One candidate per position from ``logits`` ``[B, L, V]`` (the mask token excluded).

    ``noise`` (``Exp(1)`` draws shaped like ``logits``; None when greedy) picks the token
    ``argmax p / noise``, a draw from ``p``: what ``torch.multinomial`` computes, with the
    draws given so that each row's can come from its own stream (:mod:`.draws`)."""
    logits = logits.float()
    logits[..., mask_token_id] = float("-inf")
    probs = logits.softmax(dim=-1)
    if temperature <= 0:
        tokens = logits.max(dim=-1).indices  # argmax's first-maximum rule, 1.5x faster on CPU
        return Proposal(tokens, torch.zeros(tokens.shape, device=logits.device), probs)
    if noise is None:
        raise ValueError("sampling at temperature > 0 needs noise draws")
    logp = sampling_logits(logits, temperature, top_k, top_p).log_softmax(dim=-1)
    tokens = (logp.exp() / noise).argmax(dim=-1)
    return Proposal(tokens, logp.gather(-1, tokens[..., None])[..., 0], probs)


def scores(proposal: Proposal, remasking: str, uniform: torch.Tensor | None) -> torch.Tensor:
    """Higher score = unmask sooner. ``[B, L]``; the ``random`` rule's are ``uniform`` draws."""
    probs = proposal.probs
    if remasking in ("low_confidence", "threshold"):
        return probs.gather(-1, proposal.tokens[..., None])[..., 0]
    if remasking == "margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if remasking == "entropy":
        return (probs * probs.clamp_min(1e-30).log()).sum(dim=-1)  # negative entropy
    if remasking == "random":
        if uniform is None:
            raise ValueError("random remasking needs uniform draws")
        return uniform
    raise ValueError(f"unknown remasking {remasking!r}; choose one of {REMASKING}")


def select(
    score: torch.Tensor,
    candidates: torch.Tensor,
    quota: torch.Tensor | None,
    threshold: float | None,
) -> torch.Tensor:
    """Bool ``[B, L]`` of positions to commit this step.

    Static rule: the ``quota[b]`` best-scoring candidates (never more than remain).
    Dynamic rule (``threshold``): every candidate scoring at least ``threshold``, and at least
    the best one, so every row with candidates makes progress.
    """
    score = score.masked_fill(~candidates, float("-inf"))
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    positions = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    if threshold is not None:
        chosen = (score >= threshold) | (rank == 0)
    else:
        assert quota is not None
        chosen = rank < quota[:, None]
    return chosen & candidates
