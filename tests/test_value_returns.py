"""Returns and GAE over trace steps: the recursion, its special cases, and the variance it saves.

The variance check is exact: a toy policy over 4 binary tokens unmasked in a fixed trace (one
step with two tokens in parallel) is small enough to enumerate, so the true expected return of
every state is known and the moments of both advantage estimators are computed, not sampled.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from unmask.objectives import group_advantages
from unmask.objectives.value import gae, token_returns, token_rewards, value_loss, whiten


def _ranks(steps):
    """Dense step ranks per row; -1 stays -1."""
    out = torch.full_like(steps, -1)
    for b, row in enumerate(steps):
        ids = sorted({int(s) for s in row if s >= 0})
        for j, s in enumerate(row):
            if s >= 0:
                out[b, j] = ids.index(int(s))
    return out


def reference_gae(values, rewards, ranks, gamma, lam):
    """The recursion written out step by step, one rollout at a time."""
    returns, advantages = torch.zeros_like(values), torch.zeros_like(values)
    for b in range(values.shape[0]):
        steps = sorted({int(r) for r in ranks[b] if r >= 0})
        members = {t: [j for j in range(values.shape[1]) if ranks[b, j] == t] for t in steps}
        v = {t: values[b, members[t]].mean() for t in steps}
        r = {t: rewards[b, members[t]].mean() for t in steps}
        big_r, big_a, v_next = 0.0, 0.0, 0.0
        for t in reversed(steps):
            for j in members[t]:
                returns[b, j] = rewards[b, j] + gamma * big_r
                advantages[b, j] = (
                    rewards[b, j] - values[b, j] + gamma * v_next + gamma * lam * big_a
                )
            big_a = r[t] - v[t] + gamma * v_next + gamma * lam * big_a
            big_r = r[t] + gamma * big_r
            v_next = v[t]
    return returns, advantages


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    steps = torch.tensor(
        [
            [0, 1, 1, 2, 4, 4, 5, -1],  # multi-token steps and a never-decoded tail
            [3, 0, 2, 1, 1, 5, 6, 7],
            [0, 0, 0, 0, -1, -1, -1, -1],  # everything in one step
        ]
    )
    ranks = _ranks(steps)
    values = torch.randn(ranks.shape, generator=g)
    outcome = torch.tensor([1.5, -0.5, 2.0])
    process = torch.randn(ranks.shape, generator=g)
    return ranks, values, outcome, process


def test_outcome_reward_sits_on_the_last_step(batch):
    ranks, _, outcome, process = batch
    r = token_rewards(ranks, outcome)
    assert r[0].tolist() == [0, 0, 0, 0, 0, 0, 1.5, 0]
    assert r[1].tolist() == [0, 0, 0, 0, 0, 0, 0, -0.5]
    assert r[2].tolist() == [2.0] * 4 + [0.0] * 4
    with_process = token_rewards(ranks, outcome, process)
    assert torch.allclose(with_process, r + torch.where(ranks >= 0, process, 0.0))


def test_gamma_lam_one_gives_the_outcome_minus_own_value(batch):
    ranks, values, outcome, _ = batch
    rewards = token_rewards(ranks, outcome)
    returns, adv = token_returns(rewards, ranks, 1.0), gae(values, rewards, ranks, 1.0, 1.0)
    trained = ranks >= 0
    total = outcome[:, None].expand_as(values)
    assert torch.allclose(returns[trained], total[trained], atol=1e-6)
    assert torch.allclose(adv[trained], (total - values)[trained], atol=1e-6)
    assert (returns[~trained] == 0).all() and (adv[~trained] == 0).all()


def test_lambda_zero_bootstraps_from_the_next_step_mean(batch):
    ranks, values, outcome, _ = batch
    rewards = token_rewards(ranks, outcome)
    adv = gae(values, rewards, ranks, 1.0, 0.0)
    b, j = 0, 3  # step rank 2; the next step (rank 3) holds tokens 4 and 5
    expected = rewards[b, j] - values[b, j] + values[b, 4:6].mean()
    assert torch.allclose(adv[b, j], expected)


@pytest.mark.parametrize(("gamma", "lam"), [(0.9, 0.5), (0.99, 1.0), (0.5, 0.0)])
def test_gae_matches_the_recursion(batch, gamma, lam):
    ranks, values, outcome, process = batch
    rewards = token_rewards(ranks, outcome, process)
    got = token_returns(rewards, ranks, gamma), gae(values, rewards, ranks, gamma, lam)
    want = reference_gae(values, rewards, ranks, gamma, lam)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_whiten_and_clipped_value_loss():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 7.0, 7.0]])
    w = whiten(x, mask)
    assert torch.allclose(w[mask], torch.tensor([-1.0, 0.0, 1.0])) and (w[~mask] == 0).all()

    old = torch.zeros(2, 3)
    values = torch.tensor([[0.5, -0.1, 0.0], [0.3, 0.0, 0.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    divisors = torch.tensor([2.0, 1.0])
    out = value_loss(values, old, returns, mask, torch.tensor([0, 1]), divisors, epsilon=0.2)
    # token (0,0): V moved 0.5 > 0.2 towards R, the clipped error (0.8^2) is larger and has no
    # gradient; token (0,1): inside the range; token (1,0): moved away, unclipped error larger.
    want = 0.5 * (0.8**2 / 2 + 1.1**2 / 2 + 1.3**2 / 1)
    assert out.loss.item() == pytest.approx(want)
    assert out.metrics["value_clip_ratio"].item() == pytest.approx(2 / 3)
    out.loss.backward()
    assert values.grad[0, 0] == 0 and values.grad[0, 1] != 0 and values.grad[1, 0] != 0


# -- the enumerable toy ---------------------------------------------------------------------
STEPS = [1, 0, 2, 2]  # token 1 first, then token 0, then tokens 2 and 3 in parallel
L = len(STEPS)


def _toy_policy(theta, weights, tokens, revealed):
    """log pi(x_j | state) for every position: a logistic model of the visible tokens."""
    sign = 2.0 * torch.tensor(tokens, dtype=torch.float32) - 1.0
    visible = sign * torch.tensor(revealed, dtype=torch.float32)
    return torch.nn.functional.logsigmoid(sign * (theta + weights @ visible))


def _reward(x):
    return float(x[0] * x[1] + 0.5 * x[3] - x[0] * x[2] + 0.25 * x[2] * x[3])


def test_value_advantage_has_lower_variance_and_the_same_mean():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(L, generator=g).requires_grad_()
    weights = (1.5 * torch.randn(L, L, generator=g)).requires_grad_()
    trajectories = list(itertools.product([0, 1], repeat=L))
    logp_tokens = []  # [S, L]: log pi of each token in the state it is unmasked from
    for x in trajectories:
        per_step = [_toy_policy(theta, weights, x, [s < t for s in STEPS]) for t in STEPS]
        logp_tokens.append(torch.stack([per_step[j][j] for j in range(L)]))
    logp_tokens = torch.stack(logp_tokens)
    prob = logp_tokens.sum(dim=1).exp()
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-5)
    rewards = torch.tensor([_reward(x) for x in trajectories])
    xs = torch.tensor(trajectories)

    # The true value of the state token j is unmasked from: E[R | tokens of earlier steps].
    p = prob.detach()
    values = torch.zeros(len(trajectories), L)
    for i, x in enumerate(xs):
        for j in range(L):
            earlier = torch.tensor([s < STEPS[j] for s in STEPS])
            same = (xs[:, earlier] == x[earlier]).all(dim=1)
            values[i, j] = (p * same * rewards).sum() / (p * same).sum()
    ranks = torch.tensor(STEPS).expand(len(trajectories), L)
    adv_value = gae(values, token_rewards(ranks, rewards), ranks, 1.0, 1.0)
    assert torch.allclose(adv_value, rewards[:, None] - values, atol=1e-6)

    # The group baseline (G = 4, no std scaling), exactly: every group of 4 trajectories.
    G = 4
    groups = torch.cartesian_prod(*[torch.arange(len(trajectories))] * G)
    adv_group = group_advantages(rewards[groups].flatten(), G, "none").advantages.view(-1, G)
    weight = p[groups].prod(dim=1).double()
    group_mean = float((weight[:, None] * adv_group.double()).sum() / G)
    group_var = float((weight[:, None] * adv_group.double() ** 2).sum() / G) - group_mean**2
    assert weight.sum().item() == pytest.approx(1.0, abs=1e-5)

    pd = p.double()
    value_mean = float((pd[:, None] * adv_value.double()).sum() / L)
    value_var = float((pd[:, None] * adv_value.double() ** 2).sum() / L) - value_mean**2
    assert value_mean == pytest.approx(group_mean, abs=1e-6)
    assert value_mean == pytest.approx(0.0, abs=1e-6)
    assert value_var < 0.8 * group_var, (value_var, group_var)

    # The per-token policy-gradient estimate: same mean (the exact gradient of E[R]) as with
    # the ideal constant baseline E[R], lower variance.
    params = [theta, weights]
    exact = torch.autograd.grad((prob * rewards).sum(), params, retain_graph=True)
    exact = torch.cat([e.flatten() for e in exact])

    def estimates(adv):
        rows = []
        for i in range(len(trajectories)):
            grads = torch.autograd.grad((adv[i] * logp_tokens[i]).sum(), params, retain_graph=True)
            rows.append(torch.cat([gr.flatten() for gr in grads]))
        return torch.stack(rows).double()

    constant = (rewards - (p * rewards).sum())[:, None].expand(-1, L)
    for adv in (adv_value, constant):
        est = estimates(adv)
        assert torch.allclose((pd[:, None] * est).sum(0), exact.double(), atol=1e-5)
    var_value = (pd[:, None] * (estimates(adv_value) - exact.double()) ** 2).sum()
    var_const = (pd[:, None] * (estimates(constant) - exact.double()) ** 2).sum()
    assert var_value < 0.8 * var_const, (float(var_value), float(var_const))
