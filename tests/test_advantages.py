"""Group-relative advantages, as TRL computes them."""

from __future__ import annotations

import pytest
import torch

from unmask.objectives.advantages import group_advantages

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 0.0, 1.0])


def test_group_scaling():
    out = group_advantages(REWARDS, num_generations=4)
    std0 = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    std2 = torch.tensor([0.0, 3.0, 0.0, 1.0]).std()
    expected = torch.cat(
        [
            (torch.tensor([1.0, 0.0, 0.0, 1.0]) - 0.5) / (std0 + 1e-4),
            torch.zeros(4),
            (torch.tensor([0.0, 3.0, 0.0, 1.0]) - 1.0) / (std2 + 1e-4),
        ]
    )
    torch.testing.assert_close(out.advantages, expected)
    assert out.kept.all()
    assert out.metrics["frac_reward_zero_std"] == pytest.approx(1 / 3)
    assert out.metrics["reward"] == pytest.approx(REWARDS.mean().item())


def test_batch_and_no_scaling():
    centred = REWARDS - REWARDS.view(3, 4).mean(dim=1).repeat_interleave(4)
    batch = group_advantages(REWARDS, 4, scale_rewards="batch")
    torch.testing.assert_close(batch.advantages, centred / (REWARDS.std() + 1e-4))
    for none in ("none", False):
        torch.testing.assert_close(group_advantages(REWARDS, 4, none).advantages, centred)
    torch.testing.assert_close(
        group_advantages(REWARDS, 4, True).advantages, group_advantages(REWARDS, 4).advantages
    )


def test_zero_std_groups_dropped_or_kept():
    dropped = group_advantages(REWARDS, 4, drop_zero_std=True)
    assert dropped.kept.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    assert (dropped.advantages[4:8] == 0).all()
    assert group_advantages(REWARDS, 4, drop_zero_std=False).kept.all()


@pytest.mark.parametrize(
    ("rewards", "g", "kw", "match"),
    [
        (REWARDS, 5, {}, "divisible"),
        (REWARDS, 1, {}, "num_generations"),
        (torch.tensor([1.0, float("nan")]), 2, {}, "finite"),
        (REWARDS, 4, {"scale_rewards": "std"}, "scale_rewards"),
    ],
)
def test_errors(rewards, g, kw, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, g, **kw)
