"""Exact selection end to end, against every trajectory of a toy (docs/objectives.md, "Exact
selection"; invariant 2).

Toy: a nano full-attention model, vocabulary 7 (6 candidates besides the mask), prompt "ab",
one block of 3 completion tokens. The log-prob of every token at every state is tabulated once
(7^3 states); an independent brute force pushes every joint draw of a step through the
sampler's own ``scores`` and ``select`` and multiplies the steps into the probability of every
trajectory (tokens and steps). Against it:

* the replayed exact log-probability (TraceRL views with ``selection="exact"`` through
  ``token_logprobs``) of every trajectory equals the enumerated one, and over all trajectories
  the probabilities sum to 1, for every remasking rule (the rules that ignore the draws add
  their parameter-free choice factor: ``1 / C(m, k)`` for ``random``);
* the sampler's frequencies match them (chi-square, 4,000 seeded samples per rule), and the
  sampler's own recorded log-probs plus selection terms equal the enumerated log-probability;
* the policy gradient: the exact TraceRL estimator's expectation (by enumeration) and the mean
  of AGRPO estimates (Monte Carlo, sampled rollouts and step draws) equal the brute-force
  gradient of E[R] under ``low_confidence``; with ``selection="ignore"`` the expectation is off.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

from toy_tables import logprob_table
from unmask.models import build_char_tokenizer, from_preset
from unmask.objectives import get_objective, token_logprobs
from unmask.sampling import Rollout, Sampler, SamplerConfig
from unmask.sampling.remasking import Proposal, sampling_logits, scores, select

L = 3
TOKENIZER = build_char_tokenizer(alphabet="ab")
MASK = TOKENIZER.mask_token_id
PROMPT = TOKENIZER("ab")["input_ids"]
TOKENS = [t for t in range(len(TOKENIZER)) if t != MASK]
VALUES = [MASK, *TOKENS]
# rule, steps per block (quota rules) or threshold, temperature, top_k
RULES = {
    "low_confidence": ("low_confidence", 2, 1.0, 0),
    "low_confidence-1": ("low_confidence", 3, 0.8, 4),
    "threshold": ("threshold", 0.6, 1.0, 0),
    "random": ("random", 2, 1.0, 0),
    "margin": ("margin", 2, 1.0, 0),
    "entropy": ("entropy", 3, 0.9, 0),
}
SAMPLES = 4000  # the nano model forwards about 5,000 rows a second on one CPU core


@pytest.fixture(scope="module")
def toy():
    model = from_preset("nano-full", tokenizer=TOKENIZER, seed=3).eval()
    with torch.no_grad():
        model.model.model.norm.weight.mul_(8.0)  # context-dependent, not one-hot, distributions
    states = list(itertools.product(VALUES, repeat=L))
    return model, states, {s: i for i, s in enumerate(states)}


def _param(model):
    return model.model.model.norm.weight


def quota(spb: int, step: int) -> int:
    """The sampler's front-loaded split of the block's L masks over ``spb`` steps."""
    return L // spb + (step < L % spb)


def step_outcomes(logp, rule, setting, temperature, top_k, state, step):
    """{(chosen positions, their tokens): probability} of one step from ``state``, by pushing
    every joint draw through the sampler's ``scores`` and ``select`` (``logp`` ``[L, V]``, the
    state's log-probs, graph kept)."""
    q = sampling_logits(logp, temperature, top_k, 1.0).softmax(-1)
    masked = [j for j in range(L) if state[j] == MASK]
    candidates = torch.tensor([[s == MASK for s in state]])
    if rule == "random":  # every quota-subset equally likely, independent of the draws
        k = quota(setting, step)
        out = {}
        for chosen in itertools.combinations(masked, k):
            for draw in itertools.product(TOKENS, repeat=k):
                weight = torch.stack([q[j, x] for j, x in zip(chosen, draw, strict=True)]).prod()
                out[tuple(zip(chosen, draw, strict=True))] = weight / math.comb(len(masked), k)
        return out
    draws = list(itertools.product(TOKENS, repeat=len(masked)))
    tokens = torch.zeros(len(draws), L, dtype=torch.long)
    tokens[:, masked] = torch.tensor(draws)
    p = logp.detach().exp().expand(len(draws), L, -1)
    proposal = Proposal(tokens, torch.zeros(len(draws), L), p)
    threshold = setting if rule == "threshold" else None
    k = None if threshold is not None else torch.full((len(draws),), quota(setting, step))
    chosen = select(scores(proposal, rule, None), candidates.expand(len(draws), -1), k, threshold)
    out: dict[tuple, torch.Tensor] = {}
    for row, draw in enumerate(draws):
        key = tuple((j, int(tokens[row, j])) for j in range(L) if chosen[row, j])
        weight = torch.stack([q[j, x] for j, x in zip(masked, draw, strict=True)]).prod()
        out[key] = out[key] + weight if key in out else weight
    return out


def enumerate_trajectories(table, index, name):
    """{(tokens, steps): probability (with graph)} of every trajectory the rule can produce."""
    rule, setting, temperature, top_k = RULES[name]
    found: dict[tuple, torch.Tensor] = {}

    def walk(state, steps, step, prob):
        if MASK not in state:
            found[(state, tuple(steps))] = prob
            return
        logp = table[index[state]]
        for key, p in step_outcomes(logp, rule, setting, temperature, top_k, state, step).items():
            if float(p.detach()) == 0.0:
                continue
            nxt, nsteps = list(state), list(steps)
            for j, token in key:
                nxt[j], nsteps[j] = token, step
            walk(tuple(nxt), nsteps, step + 1, prob * p)

    walk((MASK,) * L, [-1] * L, 0, torch.ones(()))
    return found


def make_rollout(keys, name):
    rule, setting, _, _ = RULES[name]
    tokens = torch.tensor([list(t) for t, _ in keys])
    return Rollout(
        prompt_ids=torch.tensor([PROMPT] * len(keys)),
        prompt_mask=torch.ones(len(keys), len(PROMPT), dtype=torch.bool),
        completion_ids=tokens,
        completion_mask=torch.ones(tokens.shape, dtype=torch.bool),  # EOS is a plain token here
        steps=torch.tensor([list(s) for _, s in keys]),
        logprobs=None,
        block_length=L,
        block_align="prompt",
        mask_token_id=MASK,
        nfe=0,
        remasking=rule,
        threshold=setting if rule == "threshold" else None,
    )


def replayed(model, keys, name, selection="exact"):
    """Per trajectory, the trace objective's log-probability through the real view path."""
    _, _, temperature, top_k = RULES[name]
    rollout = make_rollout(keys, name)
    views = get_objective("tracerl", selection=selection).views(rollout)
    logp = token_logprobs(model, views, 4096, temperature=temperature, top_k=top_k)
    per_view = (views.weights * logp).sum(dim=1)
    return torch.zeros(len(keys)).index_add(0, views.rollout_index, per_view)


def choice_factor(name, steps) -> float:
    """The rule's parameter-free probability of its choices: ``random`` picks each quota-subset
    with 1 / C(m, k); the other rules' choice is in the likelihood or fixed by the state."""
    rule, setting, _, _ = RULES[name]
    if rule != "random":
        return 1.0
    factor, left = 1.0, L
    for t in range(max(steps) + 1):
        k = quota(setting, t)
        factor, left = factor / math.comb(left, k), left - k
    return factor


def all_traces(name):
    """Every (tokens, steps) the step schedule allows, whatever its probability."""
    rule, setting, _, _ = RULES[name]
    out = []
    for steps in itertools.product(range(L), repeat=L):
        used = sorted(set(steps))
        if used != list(range(len(used))):
            continue
        if rule != "threshold" and [steps.count(t) for t in used] != [
            quota(setting, t) for t in used
        ]:
            continue
        out.extend((tokens, steps) for tokens in itertools.product(TOKENS, repeat=L))
    return out


@pytest.fixture(scope="module")
def tables(toy):
    model, states, index = toy
    with torch.no_grad():
        table = logprob_table(model, states, PROMPT, MASK)
    return {name: enumerate_trajectories(table, index, name) for name in RULES}


@pytest.mark.parametrize("name", list(RULES))
def test_replayed_probabilities_are_the_enumerated_ones_and_sum_to_one(toy, tables, name):
    model = toy[0]
    enumerated = tables[name]
    assert sum(float(p) for p in enumerated.values()) == pytest.approx(1.0, abs=1e-5)
    keys = list(enumerated)
    with torch.no_grad():
        logp = replayed(model, keys, name)
    factor = torch.tensor([choice_factor(name, s) for _, s in keys]).log()
    exact = torch.stack([enumerated[k] for k in keys])
    torch.testing.assert_close((logp + factor).exp(), exact, atol=1e-5, rtol=1e-4)
    if RULES[name][0] == "low_confidence":
        # the closed form alone is a distribution over every trace the schedule allows (under
        # threshold it also gives mass to outcomes the rule cannot produce, several committed
        # tokens with one below tau: a locally constant indicator it leaves out)
        traces = all_traces(name)
        with torch.no_grad():
            total = replayed(model, traces, name).exp().sum()
        assert float(total) == pytest.approx(1.0, abs=1e-5)


def chi_square_quantile(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def sample(model, name, count, seed, return_logprobs=False):
    rule, setting, temperature, top_k = RULES[name]
    config = SamplerConfig(
        gen_length=L, block_length=L, remasking=rule, temperature=temperature, top_k=top_k,
        steps_per_block=None if rule == "threshold" else setting,
        threshold=setting if rule == "threshold" else 0.9,
        stop_at_eos=False, seed=seed, return_logprobs=return_logprobs,
    )  # fmt: skip
    with torch.no_grad():
        return Sampler(config).generate(model, [PROMPT] * count)


_samples: dict[str, dict[tuple, int]] = {}


def sampled_counts(model, name):
    """Trajectory counts of SAMPLES seeded draws (cached: two tests read low_confidence's)."""
    if name not in _samples:
        _samples[name] = frequencies(sample(model, name, SAMPLES, seed=11))
    return _samples[name]


def frequencies(rollout):
    counts: dict[tuple, int] = {}
    for ids, steps in zip(rollout.completion_ids.tolist(), rollout.steps.tolist(), strict=True):
        key = (tuple(ids), tuple(steps))
        counts[key] = counts.get(key, 0) + 1
    return counts


def chi_square(counts, probs, total):
    """Pearson's statistic with cells of expected count < 5 pooled; and its degrees of freedom."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for key, p in probs.items():
        expected, observed = p * total, counts.get(key, 0)
        if expected < 5:
            pooled_obs, pooled_exp = pooled_obs + observed, pooled_exp + expected
            continue
        stat, cells = stat + (observed - expected) ** 2 / expected, cells + 1
    unseen = sum(n for key, n in counts.items() if key not in probs)
    pooled_obs += unseen
    if pooled_exp > 0:
        stat, cells = stat + (pooled_obs - pooled_exp) ** 2 / pooled_exp, cells + 1
    elif pooled_obs:
        stat = math.inf
    return stat, cells - 1


@pytest.mark.parametrize("name", list(RULES))
def test_the_sampler_draws_trajectories_with_the_enumerated_probabilities(toy, tables, name):
    model = toy[0]
    probs = {k: float(p) for k, p in tables[name].items()}
    stat, df = chi_square(sampled_counts(model, name), probs, SAMPLES)
    assert df >= 10, df
    assert stat < chi_square_quantile(df), (stat, df)


def test_ignoring_the_choice_does_not_describe_the_sampler(toy, tables):
    """Under low_confidence the committed tokens' product alone, normalised over the
    trajectories, is rejected by the same test by a wide margin."""
    model = toy[0]
    keys = list(tables["low_confidence"])
    with torch.no_grad():
        ignored = replayed(model, keys, "low_confidence", selection="ignore").exp()
    probs = dict(zip(keys, (ignored / ignored.sum()).tolist(), strict=True))
    stat, df = chi_square(sampled_counts(model, "low_confidence"), probs, SAMPLES)
    assert stat > 10 * chi_square_quantile(df), (stat, df)


@pytest.mark.parametrize("name", ["low_confidence", "threshold", "low_confidence-1"])
def test_sampled_trajectories_carry_their_exact_logprob(toy, tables, name):
    """The sampler's token log-probs plus its recorded selection terms, and the replay, both
    equal the enumerated log-probability of each sampled trajectory."""
    model = toy[0]
    rollout = sample(model, name, 64, seed=5, return_logprobs=True)
    # EOS is a plain token of the toy: every token counts (the sampler's mask stops at EOS)
    rollout = replace(rollout, completion_mask=torch.ones_like(rollout.completion_mask))
    keys = [(tuple(i), tuple(s)) for i, s in zip(rollout.completion_ids.tolist(),
                                                 rollout.steps.tolist(), strict=True)]  # fmt: skip
    exact = torch.stack([tables[name][k] for k in keys]).log()
    recorded = get_objective("agrpo").sampler_logprobs(rollout).sum(dim=1)
    torch.testing.assert_close(recorded, exact, atol=2e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(replayed(model, keys, name), exact, atol=2e-5, rtol=0)


def reward(tokens) -> float:
    return float(tokens[0] == TOKENS[4]) + 0.5 * float(tokens[2] == TOKENS[5])


def grad_of(model, value):
    model.zero_grad()
    value.backward()
    return _param(model).grad.clone()


@pytest.fixture(scope="module")
def true_gradient(toy):
    """The brute-force policy gradient of E[R] under low_confidence."""
    model, states, index = toy
    table = logprob_table(model, states, PROMPT, MASK)
    enumerated = enumerate_trajectories(table, index, "low_confidence")
    keys = list(enumerated)
    expected = sum(enumerated[k] * reward(k[0]) for k in keys)
    probs = torch.stack([enumerated[k] for k in keys]).detach()
    return keys, probs, grad_of(model, expected)


@pytest.mark.parametrize("selection", ["exact", "ignore"])
def test_tracerl_gradient_expectation(toy, true_gradient, selection):
    """sum over trajectories of P R grad(replayed log-prob): the policy gradient when exact."""
    model = toy[0]
    keys, probs, truth = true_gradient
    rewards = torch.tensor([reward(k[0]) for k in keys])
    logp = replayed(model, keys, "low_confidence", selection)
    estimate = grad_of(model, (probs * rewards * logp).sum())
    error = float((estimate - truth).norm() / truth.norm())
    if selection == "exact":
        assert error < 1e-4
    else:
        assert error > 0.1


def test_agrpo_gradient_is_unbiased_with_exact_selection(toy, true_gradient):
    """The mean of AGRPO estimates R grad(sum of weighted step log-probs) over sampled
    rollouts and one uniformly drawn step each is within noise of the true gradient."""
    model = toy[0]
    truth = true_gradient[2]
    rollout = sample(model, "low_confidence", 6000, seed=2, return_logprobs=True)
    rollout = replace(rollout, completion_mask=torch.ones_like(rollout.completion_mask))
    rewards = torch.tensor([reward(ids) for ids in rollout.completion_ids.tolist()])
    objective = get_objective("agrpo", mc_samples=1, low_discrepancy=False)
    views = objective.views(rollout, torch.Generator().manual_seed(3))
    chunks = 20
    estimates = []
    for part in torch.arange(len(views)).chunk(chunks):
        v = views.select(part)
        logp = token_logprobs(model, v, 8192, temperature=1.0)
        per_view = (v.weights * logp).sum(dim=1) * rewards[v.rollout_index]
        estimates.append(grad_of(model, per_view.sum() / len(rollout.completion_ids) * chunks))
    stacked = torch.stack(estimates)
    mean, stderr = stacked.mean(dim=0), stacked.std(dim=0) / math.sqrt(chunks)
    assert ((mean - truth).abs() <= 5 * stderr + 1e-6).all()
