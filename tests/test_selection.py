"""The exact probability of a step's choice, against enumeration with the sampler's own rule.

For a step small enough to enumerate (3 masked positions, 4 tokens plus the mask token),
every joint draw x is pushed through the sampler's ``scores`` and ``select``; the probability
of a committed set S with tokens a_S is the q-mass of the draws that commit exactly it. That is
the definition; :func:`unchosen_logprob` must reproduce it (and its gradient) in closed form.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from unmask.objectives.selection import unchosen_logprob
from unmask.sampling.remasking import Proposal, sampling_logits, scores, select

MASK = 4  # the mask token: never drawn
V, L = 5, 3
SETTINGS = [  # remasking, quota (low_confidence) or threshold, temperature, top_k
    ("low_confidence", 1, 1.0, 0),
    ("low_confidence", 2, 0.7, 0),
    ("low_confidence", 1, 1.3, 3),
    ("threshold", 0.3, 1.0, 0),
    ("threshold", 0.45, 0.8, 3),
]


def step_distributions(logits: torch.Tensor, temperature: float, top_k: int):
    masked = logits.float().clone()
    masked[..., MASK] = float("-inf")
    q = sampling_logits(masked, temperature, top_k, 1.0).softmax(-1)
    return masked.softmax(-1), q


def enumerate_step(logits, remasking, rule, temperature, top_k, candidates):
    """{(chosen positions, their tokens): (probability, its autograd graph)} by brute force."""
    p, q = step_distributions(logits, temperature, top_k)
    outcomes: dict[tuple, torch.Tensor] = {}
    columns = [i for i in range(L) if candidates[i]]
    for draw in itertools.product(range(V - 1), repeat=len(columns)):
        tokens = torch.zeros(1, L, dtype=torch.long)
        tokens[0, columns] = torch.tensor(draw)
        proposal = Proposal(tokens, torch.zeros(1, L), p.detach())
        quota = torch.tensor([rule]) if remasking != "threshold" else None
        threshold = rule if remasking == "threshold" else None
        chosen = select(scores(proposal, remasking, None), candidates[None], quota, threshold)[0]
        key = tuple((i, int(tokens[0, i])) for i in range(L) if chosen[i])
        weight = torch.stack([q[0, i, tokens[0, i]] for i in columns]).prod()
        outcomes[key] = outcomes.get(key, 0) + weight
    return outcomes


def closed_form(logits, remasking, rule, temperature, top_k, candidates, key):
    chosen = torch.zeros(1, L, dtype=torch.bool)
    tokens = torch.zeros(1, L, dtype=torch.long)
    for i, token in key:
        chosen[0, i], tokens[0, i] = True, token
    _, q = step_distributions(logits, temperature, top_k)
    committed = q.gather(-1, tokens[..., None])[..., 0][chosen].log().sum()
    rest = unchosen_logprob(
        logits, candidates[None], chosen, tokens, remasking=remasking,
        threshold=rule if remasking == "threshold" else None, mask_token_id=MASK,
        temperature=temperature, top_k=top_k,
    )  # fmt: skip
    return committed + rest[0]


@pytest.mark.parametrize("setting", SETTINGS, ids=[f"{r}-{q}-t{t}-k{k}" for r, q, t, k in SETTINGS])
@pytest.mark.parametrize("seed", [0, 1])
def test_step_probability_matches_enumeration(setting, seed):
    remasking, rule, temperature, top_k = setting
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, L, V, generator=gen) * 1.5
    candidates = torch.tensor([True, True, seed == 0])
    outcomes = enumerate_step(logits, remasking, rule, temperature, top_k, candidates)
    assert sum(float(v) for v in outcomes.values()) == pytest.approx(1.0, abs=1e-6)
    for key, probability in outcomes.items():
        exact = closed_form(logits, remasking, rule, temperature, top_k, candidates, key)
        assert float(exact.exp()) == pytest.approx(float(probability), abs=1e-6), key


def test_ignoring_the_choice_is_wrong_under_low_confidence():
    """The product of the committed tokens' probabilities alone (what a trace likelihood that
    ignores selection computes) is far from the enumerated probability of the step."""
    logits = torch.randn(1, L, V, generator=torch.Generator().manual_seed(3)) * 1.5
    candidates = torch.ones(L, dtype=torch.bool)
    outcomes = enumerate_step(logits, "low_confidence", 1, 1.0, 0, candidates)
    _, q = step_distributions(logits, 1.0, 0)
    ignored = {key: float(q[0, key[0][0], key[0][1]]) for key in outcomes}
    worst = max(abs(ignored[k] - float(v)) for k, v in outcomes.items())
    assert worst > 0.05
    assert sum(ignored.values()) > 1.5  # not even a distribution over the step's outcomes


@pytest.mark.parametrize("remasking, rule", [("low_confidence", 1), ("threshold", 0.3)])
def test_gradient_matches_the_enumerated_gradient(remasking, rule):
    """d log P(S, a_S) by the closed form equals the gradient of the brute-force sum, for
    every outcome (the counted sets are locally constant, so both differentiate q only)."""
    base = torch.randn(1, L, V, generator=torch.Generator().manual_seed(5))
    candidates = torch.ones(L, dtype=torch.bool)
    logits = base.clone().requires_grad_(True)
    outcomes = enumerate_step(logits, remasking, rule, 0.9, 0, candidates)
    for key, probability in outcomes.items():
        (brute,) = torch.autograd.grad(probability.log(), logits, retain_graph=True)
        exact = closed_form(logits, remasking, rule, 0.9, 0, candidates, key)
        (mine,) = torch.autograd.grad(exact, logits, retain_graph=True)
        torch.testing.assert_close(mine, brute, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("remasking", ["random", "margin", "entropy"])
def test_rules_that_ignore_the_draws_add_nothing(remasking):
    """Their choice is fixed by the state (or an independent draw): the committed tokens'
    probabilities are the step's whole likelihood."""
    logits = torch.randn(2, L, V)
    chosen = torch.tensor([[True, False, False], [False, True, True]])
    out = unchosen_logprob(
        logits, torch.ones(2, L, dtype=torch.bool), chosen, torch.zeros(2, L, dtype=torch.long),
        remasking=remasking, threshold=None, mask_token_id=MASK, temperature=1.0,
    )  # fmt: skip
    assert torch.equal(out, torch.zeros(2))
