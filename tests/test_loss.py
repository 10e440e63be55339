"""The shared clipped loss, k3 KL and normalisations, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from unmask.objectives.loss import ClipConfig, LossInputs, normalizers, policy_loss
from unmask.sampling import Rollout

# one view of one rollout, five scored tokens: (ratio, advantage)
RATIOS = [0.5, 0.5, 1.5, 1.5, 1.1]
ADVANTAGES = [1.0, -1.0, 1.0, -1.0, 2.0]


def _tokens(ratios=RATIOS, advantages=ADVANTAGES):
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -3.0]])
    new = (old + torch.log(torch.tensor([ratios]))).requires_grad_()
    return new, old, torch.tensor([advantages]), torch.ones(1, 5, dtype=torch.bool)


def _loss(new, old, adv, scored, ref_logprobs=None, **clip):
    inputs = LossInputs(
        new,
        old,
        adv,
        scored,
        torch.ones(scored.shape),
        torch.tensor([0]),
        torch.tensor([5.0]),
        ref_logprobs,
    )
    return policy_loss(inputs, ClipConfig(**clip))


def test_clipped_loss_matches_hand_computation():
    new, old, adv, scored = _tokens()
    out = _loss(new, old, adv, scored, epsilon=0.2, epsilon_high=0.28)
    # per token -min(r A, clip(r, 0.8, 1.28) A)
    hand = [-0.5, 0.8, -1.28, 1.5, -2.2]
    assert out.loss.item() == pytest.approx(sum(hand) / 5, abs=1e-6)
    out.loss.backward()
    # clipped tokens (2nd: low, 3rd: high) get no gradient; others -A r / 5
    expected = [-0.5 / 5, 0.0, 0.0, 1.5 / 5, -2.2 / 5]
    torch.testing.assert_close(new.grad, torch.tensor([expected]))
    assert out.metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)
    assert out.metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 5)
    assert out.metrics["clip_ratio/region_mean"].item() == pytest.approx(2 / 5)


def test_symmetric_clip_when_epsilon_high_is_unset():
    new, old, adv, scored = _tokens()
    out = _loss(new, old, adv, scored, epsilon=0.2)
    assert out.loss.item() == pytest.approx((-0.5 + 0.8 - 1.2 + 1.5 - 2.2) / 5, abs=1e-6)


def _k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 by hand: exp(d) - d - 1 with d = log ref - log pi."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def test_k3_kl_matches_hand_value_and_is_nonnegative():
    new = torch.tensor([[-1.0, -2.0, -0.3, -0.7, -1.1]])
    ref = torch.tensor([[-1.5, -1.0, -0.3, -0.2, -3.0]])
    hand = [math.exp(d) - d - 1 for d in (-0.5, 1.0, 0.0, 0.5, -1.9)]
    scored = torch.ones(1, 5, dtype=torch.bool)
    out = _loss(new, new, torch.zeros(1, 5), scored, ref_logprobs=ref, beta=0.1)
    assert out.metrics["kl"].item() == pytest.approx(sum(hand) / 5)
    x, y = torch.randn(1, 1000), torch.randn(1, 1000)
    every = torch.ones(1, 1000, dtype=torch.bool)
    # zero advantages: the loss is beta times the summed KL, which is positive
    assert _loss(x, x, torch.zeros(1, 1000), every, ref_logprobs=y, beta=1.0).loss.item() > 0


def test_kl_term_is_added_with_beta():
    new, old, adv, scored = _tokens()
    ref = old - 0.3
    plain = _loss(new, old, adv, scored)
    with_kl = _loss(new, old, adv, scored, ref_logprobs=ref, beta=0.1)
    kl = _k3(new.detach(), ref)
    assert with_kl.loss.item() == pytest.approx(plain.loss.item() + 0.1 * kl.sum().item() / 5)
    assert with_kl.metrics["kl"].item() == pytest.approx(kl.mean().item())
    assert "kl" not in plain.metrics


def test_weights_and_unscored_tokens():
    new, old, adv, scored = _tokens([1.0] * 5, [1.0, 2.0, 3.0, 4.0, 5.0])
    scored[0, 4] = False
    weights = torch.tensor([[2.0, 1.0, 1.0, 0.5, 9.0]])
    out = policy_loss(
        LossInputs(new, old, adv, scored, weights, torch.tensor([0]), torch.tensor([4.0]))
    )
    assert out.loss.item() == pytest.approx(-(2 + 2 + 3 + 2) / 4)


def test_infinite_logprobs_are_guarded():
    new, old, adv, scored = _tokens([1.0] * 5, [1.0] * 5)
    new = new.detach().clone()
    new[0, 0] = float("-inf")  # target left the recomputed top-k support: ratio ~0
    old[0, 1] = float("-inf")  # never sampleable under the old policy: ignored
    new.requires_grad_()
    out = _loss(new, old, adv, scored, ref_logprobs=old.clone(), beta=0.1)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(new.grad).all()
    assert new.grad[0, 1] == 0


@pytest.fixture
def rollout():
    return Rollout(
        prompt_ids=torch.ones(2, 1, dtype=torch.long),
        prompt_mask=torch.ones(2, 1, dtype=torch.bool),
        completion_ids=torch.ones(2, 4, dtype=torch.long),
        completion_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool),
        steps=torch.tensor([[0, 0, 0, 1], [0, 1, 2, -1]]),
        logprobs=None,
        block_length=4,
        block_align="prompt",
        mask_token_id=3,
        nfe=0,
    )


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [("grpo", [6.0, 4.0]), ("dapo", [5.0, 5.0]), ("dr_grpo", [8.0, 8.0]), ("steps", [2.0, 4.0])],
)
def test_normalizers(rollout, loss_type, expected):
    torch.testing.assert_close(normalizers(rollout, loss_type), torch.tensor(expected))


def test_normalizers_with_dropped_rollouts_and_global_token_count(rollout):
    kept = torch.tensor([True, False])
    torch.testing.assert_close(normalizers(rollout, "grpo", kept), torch.tensor([3.0, math.inf]))
    torch.testing.assert_close(normalizers(rollout, "dr_grpo", kept), torch.tensor([4.0, math.inf]))
    torch.testing.assert_close(
        normalizers(rollout, "dapo", num_tokens=50), torch.tensor([50.0] * 2)
    )
    with pytest.raises(ValueError, match="loss_type"):
        normalizers(rollout, "bnpo")


def test_each_normalisation_on_a_batch(rollout):
    # ratio 1, advantage 1 per token: the loss is -(sum of weights / D_b) over rollouts
    scored = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    logp = torch.zeros(2, 4)
    adv = torch.tensor([1.0, 1.0])
    totals = {}
    for loss_type in ("grpo", "dapo", "dr_grpo", "steps"):
        d = normalizers(rollout, loss_type)
        out = policy_loss(
            LossInputs(logp, logp, adv, scored, scored.float(), torch.tensor([0, 1]), d)
        )
        totals[loss_type] = out.loss.item()
    assert totals == pytest.approx(
        {"grpo": -1.0, "dapo": -1.0, "dr_grpo": -5 / 8, "steps": -(3 / 2 + 2 / 4)}
    )


def test_micro_batches_add_up(rollout):
    torch.manual_seed(0)
    logp, old = torch.randn(4, 4), torch.randn(4, 4)
    adv, scored = torch.randn(2), torch.rand(4, 4) > 0.3
    weights, index = torch.rand(4, 4), torch.tensor([0, 1, 0, 1])
    d = normalizers(rollout, "grpo")
    whole = policy_loss(LossInputs(logp, old, adv, scored, weights, index, d)).loss
    parts = sum(
        policy_loss(LossInputs(logp[s], old[s], adv, scored[s], weights[s], index[s], d)).loss
        for s in (slice(0, 1), slice(1, 4))
    )
    assert whole.item() == pytest.approx(parts.item(), abs=1e-6)


def test_sequence_level_ratio(rollout):
    # rollout 0: two views, log-ratio sum 0.6 over |o|=3 -> ratio e^0.2 (clipped at 1.1, A > 0)
    # rollout 1: one view, log-ratio -0.4 over |o|=2 -> ratio e^-0.2 (not clipped, A > 0)
    old = torch.zeros(3, 4)
    new = torch.tensor([[0.2, 0.2, 0, 0], [0.2, 0, 0, 0], [-0.2, -0.2, 0, 0]]).requires_grad_()
    scored = new.detach() != 0
    adv = torch.tensor([1.0, 2.0])
    lengths = torch.tensor([3.0, 2.0])
    d = normalizers(rollout, "grpo")
    inputs = LossInputs(
        new, old, adv, scored, torch.ones(3, 4), torch.tensor([0, 0, 1]), d, lengths=lengths
    )
    out = policy_loss(inputs, ClipConfig(epsilon=0.1, level="sequence"))
    hand = (-1.1 * 1.0 - math.exp(-0.2) * 2.0) / 2
    assert out.loss.item() == pytest.approx(hand, abs=1e-6)
    assert out.metrics["clip_ratio/high_mean"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="per-rollout"):
        inputs = LossInputs(new, old, torch.ones(3, 4), scored, scored.float(),
                            torch.tensor([0, 0, 1]), d, lengths=lengths)  # fmt: skip
        policy_loss(inputs, ClipConfig(level="sequence"))
