"""Loss weights over processes: every normaliser counts the whole (global) batch, so a rollout
weighs the same on whichever process holds it, however many rollouts each process kept.

Processes are simulated in one process: each "rank" computes its divisors with the global
counts, and DDP/FSDP average the ranks' gradients, so rollout b's weight in the averaged
gradient is ``1 / (processes * D_b)``; it must equal its weight on one process holding the
whole batch.
"""

from __future__ import annotations

import pytest
import torch

from unmask.objectives.loss import LOSS_TYPES, global_normalizers, normalizers
from unmask.sampling import Rollout


def _rollout(lengths: list[int], width: int = 4) -> Rollout:
    cols = torch.arange(width)[None, :]
    mask = cols < torch.tensor(lengths)[:, None]
    steps = torch.where(mask, cols // 2, torch.full_like(cols, -1))  # two tokens a step
    n = len(lengths)
    return Rollout(
        prompt_ids=torch.ones(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1, dtype=torch.bool),
        completion_ids=torch.ones(n, width, dtype=torch.long),
        completion_mask=mask,
        steps=steps,
        logprobs=None,
        block_length=4,
        block_align="prompt",
        mask_token_id=3,
        nfe=0,
    )


class _Ranks:
    """What ``global_normalizers`` needs of an accelerator, with the sum over all simulated
    ranks' local counts standing in for the all-reduce."""

    def __init__(self, rollouts: list[Rollout], kept: list[torch.Tensor]) -> None:
        self.num_processes, self.device = len(rollouts), torch.device("cpu")
        self.totals = torch.zeros(2)
        for rollout, keep in zip(rollouts, kept, strict=True):
            tokens = (rollout.completion_mask & keep[:, None]).sum()
            self.totals += torch.tensor([float(keep.sum()), float(tokens)])

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        return self.totals.clone()


# rank 0 keeps 3 rollouts, rank 1 keeps 1 of its 3 (dropped groups, unscored samples)
LENGTHS = [[4, 2, 3], [1, 4, 2]]
KEPT = [torch.tensor([True, True, True]), torch.tensor([False, True, False])]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_rollout_weighs_the_same_on_any_rank_as_on_one_process(loss_type):
    rollouts = [_rollout(lengths) for lengths in LENGTHS]
    ranks = _Ranks(rollouts, KEPT)
    averaged = torch.cat(
        [
            1.0 / (2 * global_normalizers(ranks, r, loss_type, k))
            for r, k in zip(rollouts, KEPT, strict=True)
        ]
    )
    whole = 1.0 / normalizers(_rollout(LENGTHS[0] + LENGTHS[1]), loss_type, torch.cat(KEPT))
    torch.testing.assert_close(averaged, whole)
    assert averaged[3:].tolist() == [0.0, whole[4].item(), 0.0]  # dropped ones weigh nothing


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_rank_that_keeps_nothing_changes_no_other_rollouts_weight(loss_type):
    rollouts = [_rollout(LENGTHS[0]), _rollout(LENGTHS[1])]
    kept = [KEPT[0], torch.zeros(3, dtype=torch.bool)]
    ranks = _Ranks(rollouts, kept)
    averaged = 1.0 / (2 * global_normalizers(ranks, rollouts[0], loss_type, kept[0]))
    alone = 1.0 / normalizers(rollouts[0], loss_type, kept[0])
    torch.testing.assert_close(averaged, alone)  # not halved by the idle rank
    assert torch.isinf(global_normalizers(ranks, rollouts[1], loss_type, kept[1])).all()


def test_local_counts_weigh_the_rank_that_kept_fewer_more():
    """The bug this guards against: each rank dividing by its own kept rollouts. Under
    ``grpo`` every kept rollout's tokens should carry 1/4 of the step (4 kept in all); the
    lone rollout rank 1 kept carried twice that, and rank 0's only 1/6."""
    rollouts = [_rollout(lengths) for lengths in LENGTHS]
    mass = [
        torch.tensor(lengths) / (2 * normalizers(r, "grpo", k))
        for lengths, r, k in zip(LENGTHS, rollouts, KEPT, strict=True)
    ]
    assert mass[1][1].item() == pytest.approx(0.5) and mass[0][0].item() == pytest.approx(1 / 6)
    fixed = [
        torch.tensor(lengths) / (2 * global_normalizers(_Ranks(rollouts, KEPT), r, "grpo", k))
        for lengths, r, k in zip(LENGTHS, rollouts, KEPT, strict=True)
    ]
    assert torch.cat(fixed)[torch.cat(KEPT)].tolist() == pytest.approx([0.25] * 4)
