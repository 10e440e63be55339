"""Exact per-state log-probabilities of a toy model, for tests that enumerate every state."""

from __future__ import annotations

import torch


def logprob_table(model, states, prompt: list[int], mask: int) -> torch.Tensor:
    """log p(token | state) for every state (a tuple of completion ids, ``mask`` where hidden)
    and completion position ``[S, L, V]``, with full attention and the mask token excluded."""
    ids = torch.tensor([[*prompt, *s] for s in states])
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    bias = torch.zeros(len(states), 1, ids.shape[1], ids.shape[1])
    logits = model(ids, positions, bias)[:, len(prompt) :].float()
    logits[..., mask] = float("-inf")
    return logits.log_softmax(dim=-1)
