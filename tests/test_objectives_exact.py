"""Invariant 2: likelihood estimators against exact values on a model small enough to enumerate.

Toy setting: a nano full-attention model over a 7-token vocabulary (6 candidates besides the
mask), prompt "ab", completion length 3, one block. Every state of the completion (7^3) is
forwarded once, directly (no replay code), which gives the exact log-probs of every step of
every trajectory, the exact trajectory likelihoods, log p(o|q) under random-order unmasking,
and the exact ELBO, all differentiable in the model's parameters.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from toy_tables import logprob_table
from unmask.models import build_char_tokenizer, from_preset
from unmask.objectives import get_objective, token_logprobs
from unmask.sampling import Rollout, Sampler, SamplerConfig

L = 3
TOKENIZER = build_char_tokenizer(alphabet="ab")
MASK = TOKENIZER.mask_token_id
PROMPT = TOKENIZER("ab")["input_ids"]
VALUES = [MASK, *(t for t in range(len(TOKENIZER)) if t != MASK)]  # per position: mask or token
TRAJECTORIES = [  # (completion, steps); completions avoid EOS so the whole completion is scored
    ([5, 6, 6], [0, 1, 2]),
    ([6, 5, 6], [2, 0, 1]),
    ([5, 5, 6], [0, 0, 1]),  # two tokens unmasked in one step
    ([6, 6, 5], [1, 0, 0]),
]


@pytest.fixture(scope="module")
def toy():
    model = from_preset("nano-full", tokenizer=TOKENIZER, seed=3).eval()
    with torch.no_grad():
        model.model.model.norm.weight.mul_(30.0)  # sharper, context-dependent distributions
    states = list(itertools.product(VALUES, repeat=L))
    return model, states, {s: i for i, s in enumerate(states)}


def _param(model):
    return model.model.model.norm.weight


def exact_table(model, states):
    """log p(token | state) for every state and completion position ``[S, L, V]`` (with grad)."""
    return logprob_table(model, states, PROMPT, MASK)


def state_of(tokens, revealed):
    return tuple(t if r else MASK for t, r in zip(tokens, revealed, strict=True))


def trace_loglik(table, index, tokens, steps):
    """Exact log-likelihood of a trajectory given its unmasking order (a tensor)."""
    total = table.new_zeros(())
    for t in sorted(set(steps)):
        state = index[state_of(tokens, [s < t for s in steps])]
        total = total + sum(table[state, j, tokens[j]] for j in range(L) if steps[j] == t)
    return total


def orders():
    return [[perm.index(j) for j in range(L)] for perm in itertools.permutations(range(L))]


def log_marginal(table, index, tokens):
    """log p(o | q) under the sampler with random remasking, one token per step."""
    logliks = torch.stack([trace_loglik(table, index, tokens, o) for o in orders()])
    return torch.logsumexp(logliks, 0) - math.log(len(logliks))


def masked_sum(table, index, tokens, hidden):
    """S_M: sum over hidden positions of log p(o_j | o with M hidden)."""
    state = index[state_of(tokens, [not h for h in hidden])]
    return sum((table[state, j, tokens[j]] for j in range(L) if hidden[j]), table.new_zeros(()))


def subsets():
    return [h for h in itertools.product([False, True], repeat=L) if any(h)]


def elbo_weight(m: int, eps: float) -> float:
    """E_{t~U(eps,1)}[t^(m-1) (1-t)^(L-m)]: probability of a mask of size m over t, times 1/t."""
    n = L - m
    integral = sum(
        math.comb(n, i) * (-1) ** i * (1 - eps ** (m + i)) / (m + i) for i in range(n + 1)
    )
    return integral / (1 - eps)


def make_rollout(trajectories, logprobs=None):
    tokens = torch.tensor([t for t, _ in trajectories])
    return Rollout(
        prompt_ids=torch.tensor([PROMPT] * len(tokens)),
        prompt_mask=torch.ones(len(tokens), len(PROMPT), dtype=torch.bool),
        completion_ids=tokens,
        completion_mask=torch.ones(tokens.shape, dtype=torch.bool),
        steps=torch.tensor([s for _, s in trajectories]),
        logprobs=logprobs,
        block_length=L,
        block_align="prompt",
        mask_token_id=MASK,
        nfe=0,
    )


def estimates(model, views, num_rollouts):
    """sum of weight * log-prob per rollout, through the real view -> forward path.

    Identical views (same input, targets and scored columns) are forwarded once.
    """
    key = torch.cat([views.input_ids, views.targets, views.scored.long()], dim=1)
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)
    first = torch.full((len(unique),), len(views)).scatter_reduce(
        0, inverse, torch.arange(len(views)), "amin"
    )
    logp = token_logprobs(model, views.select(first), micro_batch_size=256)[inverse]
    per_view = (views.weights * logp).sum(dim=1)
    return torch.zeros(num_rollouts).index_add(0, views.rollout_index, per_view)


def grad(model, value):
    model.zero_grad()
    value.backward(retain_graph=True)
    return _param(model).grad.clone()


def test_enumeration_is_the_sampler_distribution(toy):
    model, states, index = toy
    with torch.no_grad():
        table = exact_table(model, states)
        total = sum(
            log_marginal(table, index, list(o)).exp()
            for o in itertools.product(VALUES[1:], repeat=L)
        )
        assert abs(float(total) - 1.0) < 1e-5
        config = SamplerConfig(
            gen_length=L, block_length=L, remasking="random", temperature=1.0,
            return_logprobs=True, stop_at_eos=False, seed=7,
        )  # fmt: skip
        rollout = Sampler(config).generate(model, [PROMPT] * 16)
    for tokens, steps, logp in zip(
        rollout.completion_ids, rollout.steps, rollout.logprobs, strict=True
    ):
        exact = trace_loglik(table, index, tokens.tolist(), steps.tolist())
        assert abs(float(logp.sum() - exact)) < 1e-5


def test_tracerl_sum_is_the_exact_trajectory_loglik_and_gradient(toy):
    model, states, index = toy
    trajectories = [(o, s) for o in ([5, 6, 6], [6, 5, 5]) for s in orders()] + TRAJECTORIES
    views = get_objective("tracerl").views(make_rollout(trajectories))
    est = estimates(model, views, len(trajectories))
    table = exact_table(model, states)
    exact = torch.stack([trace_loglik(table, index, t, s) for t, s in trajectories])
    torch.testing.assert_close(est, exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        grad(model, est.sum()), grad(model, exact.sum()), atol=1e-4, rtol=1e-4
    )


def test_diffu_grpo_is_the_mean_field_estimate(toy):
    model, states, index = toy
    views = get_objective("diffu_grpo", p_mask_prompt=0.0).views(make_rollout(TRAJECTORIES))
    est = estimates(model, views, len(TRAJECTORIES))
    table = exact_table(model, states)
    exact = torch.stack([masked_sum(table, index, t, [True] * L) for t, _ in TRAJECTORIES])
    torch.testing.assert_close(est, exact, atol=1e-5, rtol=0)


def _step_average(table, index, tokens, steps):
    return trace_loglik(table, index, tokens, steps) / len(set(steps))


def test_agrpo_stratified_draws_cover_every_step_exactly(toy):
    # One rollout with K = n stratified uniforms: every step is drawn once, weight 1.
    model, states, index = toy
    table = exact_table(model, states)
    est, exact = [], []
    for tokens, steps in TRAJECTORIES:
        n = len(set(steps))
        rollout = make_rollout([(tokens, steps)], logprobs=torch.zeros(1, L))
        views = get_objective("agrpo", mc_samples=n).views(
            rollout, torch.Generator().manual_seed(n)
        )
        est.append(estimates(model, views, 1)[0] / n)
        exact.append(_step_average(table, index, tokens, steps))
    est, exact = torch.stack(est), torch.stack(exact)
    torch.testing.assert_close(est, exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        grad(model, est.sum()), grad(model, exact.sum()), atol=1e-4, rtol=1e-4
    )


def _check_unbiased(model, table, estimator, exact, copies):
    """Mean and mean gradient of ``estimator`` [len(TRAJECTORIES) * copies] against ``exact``."""
    per_traj = estimator.view(len(TRAJECTORIES), copies)
    mean, stderr = per_traj.mean(dim=1), per_traj.std(dim=1) / math.sqrt(copies)
    assert ((mean - exact).abs() <= 4 * stderr + 1e-5).all(), (mean, exact, stderr)
    g_est, g_exact = grad(model, per_traj.mean(dim=1).sum()), grad(model, exact.sum())
    assert (g_est - g_exact).norm() <= 0.05 * g_exact.norm()


@pytest.mark.parametrize(
    "options",
    [
        {"step_sampling": "uniform", "low_discrepancy": False, "mc_samples": 1},
        {"step_sampling": "surprisal", "low_discrepancy": True, "mc_samples": 2},
    ],
)
def test_agrpo_is_unbiased_for_the_step_average(toy, options):
    model, states, index = toy
    copies = 2000
    table = exact_table(model, states)
    trajectories = [t for t in TRAJECTORIES for _ in range(copies)]
    sampled = [  # the sampler's log-probs, which drive the surprisal proposal
        [table[index[state_of(o, [x < s[j] for x in s])], j, o[j]].item() for j in range(L)]
        for o, s in TRAJECTORIES
    ]
    rollout = make_rollout(trajectories, torch.tensor(sampled).repeat_interleave(copies, dim=0))
    views = get_objective("agrpo", **options).views(rollout, torch.Generator().manual_seed(0))
    steps = torch.tensor([len(set(s)) for _, s in trajectories])
    est = estimates(model, views, len(trajectories)) / steps
    exact = torch.stack([_step_average(table, index, t, s) for t, s in TRAJECTORIES])
    _check_unbiased(model, table, est, exact, copies)


def test_elbo_estimator_is_unbiased_and_below_the_loglik(toy):
    model, states, index = toy
    eps, copies = 0.05, 2000
    table = exact_table(model, states)
    elbo, expected = [], []
    for tokens, _ in TRAJECTORIES:
        sums = {h: masked_sum(table, index, tokens, h) for h in subsets()}
        elbo.append(sum(sums[h] / (sum(h) * math.comb(L, sum(h))) for h in sums))
        expected.append(sum(elbo_weight(sum(h), eps) * sums[h] for h in sums))
        # the ELBO is the expected any-order log-likelihood, hence below log p(o|q)
        any_order = torch.stack([trace_loglik(table, index, tokens, o) for o in orders()]).mean()
        torch.testing.assert_close(elbo[-1], any_order, atol=1e-5, rtol=0)
        assert elbo[-1].item() < log_marginal(table, index, tokens).item()
    for e, x in zip(elbo, expected, strict=True):  # eps only drops a sliver of the t integral
        assert (e - x).abs().item() < 0.1 * e.abs().item()
    rollout = make_rollout([t for t in TRAJECTORIES for _ in range(copies)])
    views = get_objective("elbo", mc_samples=1, eps=eps).views(
        rollout, torch.Generator().manual_seed(0)
    )
    est = estimates(model, views, len(TRAJECTORIES) * copies)
    _check_unbiased(model, table, est, torch.stack(expected), copies)


def _ratio_law(t_min, t_max):
    """P(m hidden tokens) for t ~ U(t_min, t_max) and m = clamp(round(t L), 1, L)."""
    law = dict.fromkeys(range(1, L + 1), 0.0)
    for m in range(L + 1):
        lo, hi = max((m - 0.5) / L, t_min), min((m + 0.5) / L, t_max)
        law[min(max(m, 1), L)] += max(hi - lo, 0.0) / (t_max - t_min)
    return law


@pytest.mark.parametrize("name", ["random_mask", "coupled"])
def test_random_mask_estimators_match_their_exact_expectation(toy, name):
    model, states, index = toy
    copies = 2000
    table = exact_table(model, states)
    objective = get_objective(name)
    law = _ratio_law(objective.t_min, objective.t_max)
    expected = []
    for tokens, _ in TRAJECTORIES:
        value = table.new_zeros(())
        for h in subsets():
            m = sum(h)
            s = masked_sum(table, index, tokens, h)
            if name == "random_mask":  # the mean over hidden tokens, times n
                value = value + law[m] / math.comb(L, m) * s * L / m
            else:  # the pair (M, complement) scores every token once
                rest = tuple(not x for x in h)
                other = masked_sum(table, index, tokens, rest) if any(rest) else 0.0
                value = value + law[m] / math.comb(L, m) * (s + other)
        expected.append(value)
    rollout = make_rollout([t for t in TRAJECTORIES for _ in range(copies)])
    views = objective.views(rollout, torch.Generator().manual_seed(0))
    est = estimates(model, views, len(TRAJECTORIES) * copies)
    _check_unbiased(model, table, est, torch.stack(expected), copies)
