"""wd1 against hand computations: the group-softmax weights (Eq. 9) and the gradient of its
weighted log-likelihood (Eq. 8) through the shared loss at ratio 1."""

from __future__ import annotations

import math

import pytest
import torch

from tiny_rl import read_metrics, rl_config, sevens_task
from unmask.models import build_char_tokenizer, from_preset
from unmask.objectives import (
    LossInputs,
    Objective,
    get_objective,
    normalizers,
    policy_loss,
    token_logprobs,
)
from unmask.objectives.wd1 import wd1_coefficients
from unmask.sampling import Rollout
from unmask.train.rl import RLTrainer

TOKENIZER = build_char_tokenizer(alphabet="ab")
MASK = TOKENIZER.mask_token_id
PROMPT = TOKENIZER("ab")["input_ids"]
COMPLETIONS = [[5, 6, 6], [6, 5, 6], [5, 5, 6], [6, 6, 5], [5, 6, 5], [6, 6, 6]]
REWARDS = [1.0, 0.0, 0.0, 2.0, 1.0, 1.0]  # two groups of 3; the second has reward spread too


def hand_weights(rewards, psi):
    """w+ and w- of one group, written out."""
    mean = sum(rewards) / len(rewards)
    adv = [r - mean for r in rewards]
    pos = [math.exp(psi * a) for a in adv]
    neg = [math.exp(-psi * a) for a in adv]
    return [p / sum(pos) for p in pos], [n / sum(neg) for n in neg]


@pytest.mark.parametrize("psi", [1.0, 0.5])
def test_weights_match_hand_computation(psi):
    coef, hand = [], []
    for group in (REWARDS[:3], REWARDS[3:]):
        mean = sum(group) / 3
        coef.append(wd1_coefficients(torch.tensor([r - mean for r in group]), 3, psi))
        pos, neg = hand_weights(group, psi)
        hand.append(torch.tensor([p - n for p, n in zip(pos, neg, strict=True)]))
    torch.testing.assert_close(torch.cat(coef), torch.cat(hand))
    # a group whose rewards agree has w+ = w-: no learning signal
    assert wd1_coefficients(torch.zeros(3), 3, psi).abs().max() == 0


def test_gradient_matches_hand_computation():
    model = from_preset("nano-full", tokenizer=TOKENIZER, seed=3)
    wd1 = get_objective("wd1", p_mask_prompt=0.0)
    tokens = torch.tensor(COMPLETIONS)
    rollout = Rollout(
        prompt_ids=torch.tensor([PROMPT] * 6),
        prompt_mask=torch.ones(6, len(PROMPT), dtype=torch.bool),
        completion_ids=tokens,
        completion_mask=torch.ones(tokens.shape, dtype=torch.bool),
        steps=torch.zeros(tokens.shape, dtype=torch.long),
        logprobs=None,
        block_length=3,
        block_align="prompt",
        mask_token_id=MASK,
        nfe=0,
    )
    groups = torch.tensor(REWARDS).view(2, 3)
    advantages = (groups - groups.mean(dim=1, keepdim=True)).flatten()
    param = model.model.model.norm.weight

    views = wd1.views(rollout, torch.Generator().manual_seed(0))
    logp = token_logprobs(model, views, micro_batch_size=8)
    coef, weights = wd1.reweight(views, logp.detach(), advantages, rollout.completion_lengths, 3)
    divisors = normalizers(rollout, wd1.loss_type)
    inputs = LossInputs(logp, logp.detach(), coef, views.scored, weights, views.rollout_index,
                        divisors)  # fmt: skip
    out = policy_loss(inputs)
    out.loss.backward()
    via_loss = param.grad.clone()

    # Eq. 8 by hand: 1/B sum_i (w-_i - w+_i) sum_k log pi(o_i^k | prompt, all masked), / window
    model.zero_grad()
    ids = torch.tensor([[*PROMPT, MASK, MASK, MASK]])
    positions = torch.arange(5)[None]
    logits = model(ids, positions, torch.zeros(1, 1, 5, 5))[0, len(PROMPT) :].float()
    logits[:, MASK] = float("-inf")
    table = logits.log_softmax(dim=-1)
    loss = 0.0
    for i, completion in enumerate(COMPLETIONS):
        pos, neg = hand_weights(REWARDS[3 * (i // 3) : 3 * (i // 3) + 3], 1.0)
        loglik = sum(table[k, t] for k, t in enumerate(completion))
        loss = loss + (neg[i % 3] - pos[i % 3]) * loglik / (6 * 3)
    loss.backward()
    torch.testing.assert_close(via_loss, param.grad, atol=1e-7, rtol=1e-5)
    assert via_loss.abs().sum() > 0


def test_views_are_d1s_and_options_are_checked():
    assert get_objective("wd1").p_mask_prompt == get_objective("diffu_grpo").p_mask_prompt
    with pytest.raises(ValueError, match="psi"):
        get_objective("wd1", psi=0.0)
    with pytest.raises(ValueError, match="whole groups"):
        wd1_coefficients(torch.zeros(5), 3, 1.0)


@pytest.mark.skipif(
    not hasattr(Objective, "ratio_free"), reason="needs the trainer's ratio-free hook (issue 22)"
)
def test_raises_a_toy_reward_in_the_trainer(tmp_path):
    cfg = rl_config(tmp_path, objective="wd1", max_steps=10, num_prompts=4, lr=1e-2)
    RLTrainer(cfg, task=sevens_task()).train()
    rewards = [m["reward"] for m in read_metrics(tmp_path / "run")]
    assert sum(rewards[-3:]) / 3 > 0.1 > 3 * rewards[0], rewards
