"""Exact selection in the trace objectives: every replayed step's full log-probability.

Under ``low_confidence`` and ``threshold`` remasking a step's probability is its committed
tokens' probabilities times the probability that every candidate it left masked drew a token
ranking below the committed ones (:func:`unmask.sampling.selection.unchosen_logprob`). The
trace objectives score tokens, so a step's selection term is spread evenly over the tokens it
commits and scores: each one's log-prob gets ``term / n``, the step's log-probs then sum to its
exact log-probability, and the shared per-token loss needs no change (docs/objectives.md,
"Exact selection", says why this split). The term needs the logits of the step's uncommitted
candidates too, so :class:`StepChoices` names those cells and ``token_logprobs`` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch

from unmask.sampling.rollout import Rollout
from unmask.sampling.selection import TOKEN_DEPENDENT, unchosen_logprob

if TYPE_CHECKING:
    from unmask.objectives.base import ViewBatch
    from unmask.objectives.replay import Replay

SELECTION: tuple[str, ...] = ("exact", "ignore")


@dataclass
class StepChoices:
    """The denoising steps a batch of views scores, ``K`` of them, each within one block of
    ``b`` canvas columns: ``view`` ``[K]`` (the view scoring it), ``columns`` ``[K, b]`` (its
    block's canvas columns), ``candidates`` (masked before the step) and ``chosen`` (committed
    by it) ``[K, b]``, and the rule that chose."""

    view: torch.Tensor
    columns: torch.Tensor
    candidates: torch.Tensor
    chosen: torch.Tensor
    remasking: str
    threshold: float | None

    def select(self, rows: torch.Tensor | slice, count: int) -> StepChoices:
        """The steps of views ``rows`` (distinct indices into ``count`` views), renumbered as
        :meth:`ViewBatch.select` numbers those views."""
        picked = torch.arange(count, device=self.view.device)[rows]
        new = torch.full((count,), -1, dtype=torch.long, device=self.view.device)
        new[picked] = torch.arange(len(picked), device=self.view.device)
        keep = new[self.view] >= 0
        return replace(
            self, view=new[self.view][keep], columns=self.columns[keep],
            candidates=self.candidates[keep], chosen=self.chosen[keep],
        )  # fmt: skip

    def to(self, device: torch.device | str) -> StepChoices:
        """The same steps on ``device``."""
        return replace(
            self, view=self.view.to(device), columns=self.columns.to(device),
            candidates=self.candidates.to(device), chosen=self.chosen.to(device),
        )  # fmt: skip

    def cells(self, shape: torch.Size) -> torch.Tensor:
        """Bool ``shape`` (``[N, W]``): the candidate cells whose logits the term reads."""
        out = torch.zeros(shape, dtype=torch.bool, device=self.view.device)
        rows = self.view[:, None].expand_as(self.columns)
        return out.index_put((rows[self.candidates], self.columns[self.candidates]),
                             torch.tensor(True, device=out.device))  # fmt: skip

    def shares(
        self,
        logits: torch.Tensor,
        cell: torch.Tensor,
        targets: torch.Tensor,
        scored: torch.Tensor,
        mask_token_id: int,
        temperature: float,
        top_k: int,
        top_p: float,
    ) -> torch.Tensor:
        """``[N, W]``: each scored token's share of its step's selection log-probability.

        ``logits`` ``[C, V]`` are the raw logits of the cells read, ``cell`` ``[N, W]`` the
        row of ``logits`` holding each view cell (-1 if not read); ``targets`` and ``scored``
        are the views'."""
        rows = self.view[:, None].expand_as(self.columns)
        step_logits = logits[cell[rows, self.columns].clamp(min=0)]  # [K, b, V]
        left = unchosen_logprob(
            step_logits, self.candidates, self.chosen, targets[rows, self.columns],
            remasking=self.remasking, threshold=self.threshold, mask_token_id=mask_token_id,
            temperature=temperature, top_k=top_k, top_p=top_p,
        )  # fmt: skip
        receivers = self.chosen & scored[rows, self.columns]
        share = (left / receivers.sum(dim=1).clamp(min=1))[:, None].expand_as(receivers)
        out = torch.zeros(scored.shape, dtype=share.dtype, device=share.device)
        at = (rows[receivers], self.columns[receivers])
        return out.index_put(at, share[receivers], accumulate=True)


def step_choices(
    rp: Replay, views: ViewBatch, remasking: str, threshold: float | None
) -> StepChoices:
    """The steps ``views`` score: one per (view, trace step) among its scored tokens. A step's
    candidates are its block's columns decoded at it or later, its chosen ones those decoded at
    it (the trace fixes both: a block is decoded in its own consecutive steps)."""
    v, c = views.scored.nonzero(as_tuple=True)
    r = views.rollout_index[v]
    pairs = torch.stack([v, rp.steps[r, c]])
    (view, step), first = _unique_first(pairs)
    b, canvas = rp.canvas.block_size, rp.canvas
    start = canvas.start + canvas.blocks[r[first], c[first]] * b
    columns = start[:, None] + torch.arange(b, device=start.device)
    row = views.rollout_index[view][:, None]
    at = rp.steps[row, columns]
    candidates = canvas.completion[row, columns] & (at >= step[:, None])
    return StepChoices(view, columns, candidates, at == step[:, None], remasking, threshold)


def _unique_first(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct columns of ``keys`` ``[2, n]`` and, for each, the index of one occurrence."""
    unique, inverse = torch.unique(keys, dim=1, return_inverse=True)
    first = torch.full((unique.shape[1],), keys.shape[1], device=keys.device)
    first = first.scatter_reduce(
        0, inverse, torch.arange(keys.shape[1], device=keys.device), "amin"
    )
    return unique, first


def token_shares(rollout: Rollout) -> torch.Tensor:
    """``[B, G]``: the sampler's recorded selection log-probability of each step, spread
    evenly over the completion tokens the step committed (0 elsewhere)."""
    assert rollout.selection_logprobs is not None
    steps = rollout.steps.clamp(min=0)
    scorable = rollout.completion_mask.to(rollout.selection_logprobs.dtype)
    count = torch.zeros_like(scorable).scatter_add(1, steps, scorable)
    per_token = rollout.selection_logprobs / count.clamp(min=1)
    return per_token.gather(1, steps) * scorable


@dataclass(kw_only=True)
class ExactSelection:
    """The ``selection`` option of the trace objectives (TraceRL, AGRPO).

    ``exact``: each replayed step's log-probability includes the probability that the rule
    chose its positions (only rollouts sampled with a token-dependent rule carry one);
    ``ignore``: the committed tokens' log-probs alone (the published methods)."""

    selection: Literal["exact", "ignore"] = "exact"

    def __post_init__(self) -> None:
        if self.selection not in SELECTION:
            raise ValueError(f"selection must be one of {SELECTION}, got {self.selection!r}")
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()

    def exact_for(self, rollout: Rollout) -> bool:
        """Whether this rollout's steps get a selection term."""
        return self.selection == "exact" and rollout.remasking in TOKEN_DEPENDENT

    def with_choices(self, views: ViewBatch, rp: Replay, rollout: Rollout) -> ViewBatch:
        """``views`` carrying their steps' choices, when the selection is exact."""
        if not self.exact_for(rollout):
            return views
        assert rollout.remasking is not None
        choices = step_choices(rp, views, rollout.remasking, rollout.threshold)
        return replace(views, choices=choices)

    def sampler_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """The sampler's per-token log-probs plus each token's share of its step's selection
        term, so that they are the old log-probs of what :meth:`with_choices` scores."""
        logprobs = super().sampler_logprobs(rollout)  # type: ignore[misc]
        if not self.exact_for(rollout):
            return logprobs
        if rollout.selection_logprobs is None:
            raise ValueError(
                "exact selection needs the sampler's selection log-probs: sample with "
                "return_logprobs=True (or set selection: ignore)"
            )
        return logprobs + token_shares(rollout)
