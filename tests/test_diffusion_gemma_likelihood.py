"""The trajectory likelihood of DiffusionGemma's sampler, against enumeration.

On a vocabulary-3, canvas-2 model every trajectory of a 3-step canvas is enumerated with an
independent implementation of the native rules (entropy-bound acceptance, uniform renoising,
stable-and-confident stop, self-conditioning on the previous step's tempered logits). The
probabilities sum to 1; each sampled trajectory's log-probability (uniform-noise terms plus the
trace's summed accepted-token log-probs, sampler's or replayed) is the enumerated one; and the
sampler's frequencies match the enumerated distribution (chi-square, p = 0.001 critical value).
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from gemma_models import toy_gemma
from unmask.models.diffusion_gemma import DiffusionGemma, select_rows
from unmask.objectives.step_objectives import get_step_objective
from unmask.objectives.step_replay import step_logprobs
from unmask.sampling.step_sampler import StepSampler, StepSamplerConfig

V, L, STEPS, PROMPT = 3, 2, 3, [1, 2]
CONFIG = StepSamplerConfig(
    max_new_tokens=L, max_denoising_steps=STEPS, entropy_bound=0.6, stability_threshold=1,
    confidence_threshold=0.9,
)  # fmt: skip


@pytest.fixture(scope="module")
def model() -> DiffusionGemma:
    return toy_gemma(V, L)


def _grid(n: int) -> torch.Tensor:
    """All ``V ** n`` token tuples, ``[V ** n, n]``."""
    return torch.cartesian_prod(*[torch.arange(V)] * n).view(-1, n) if n else torch.zeros(1, 0)


@torch.no_grad()
def enumerate_trajectories(model: DiffusionGemma) -> dict[tuple, tuple[float, tuple]]:
    """Every trajectory ``(x_0, x_1, ..., accepted tokens of the last step)`` with its
    log-probability and output (the last step's argmax)."""
    prompt = torch.tensor([PROMPT])
    start = torch.arange(len(PROMPT), dtype=torch.int32)[None]
    real = torch.ones_like(prompt, dtype=torch.bool)
    cache = model.encode(prompt, real, start, model.new_cache())
    positions = torch.arange(len(PROMPT), len(PROMPT) + L, dtype=torch.int32)[None]
    mask = torch.ones(1, len(PROMPT) + L, dtype=torch.bool)
    # a state: (key so far, canvas, self-conditioning or None, previous argmax or None, log p)
    states = [((tuple(x.tolist()),), x, None, None, -L * math.log(V)) for x in _grid(L)]
    leaves: dict[tuple, tuple[float, tuple]] = {}
    for index, cur in enumerate(range(STEPS, 0, -1)):
        canvas = torch.stack([s[1] for s in states])
        sc = [s[2] for s in states]
        signal = None if sc[0] is None else torch.stack(sc)
        rows = select_rows(cache, torch.zeros(len(states), dtype=torch.long))
        logits = model.decode(canvas, rows, positions, mask.expand(len(states), -1), signal)
        temperature = CONFIG.t_min + (CONFIG.t_max - CONFIG.t_min) * cur / STEPS
        logits = logits / temperature
        logp = logits.log_softmax(dim=-1)
        entropy = -(logp.exp() * logp).sum(dim=-1)
        soft = model.soft_embedding(logits)
        next_states = []
        for i, (key, _, _, previous, lp) in enumerate(states):
            order = entropy[i].argsort()
            sorted_h = entropy[i][order]
            chosen = order[(sorted_h.cumsum(0) - sorted_h) <= CONFIG.entropy_bound]
            chosen = chosen.sort().values  # the key lists accepted tokens by position
            argmax = tuple(logits[i].argmax(dim=-1).tolist())
            stop = previous == argmax and entropy[i].mean() < CONFIG.confidence_threshold
            last = stop or index == STEPS - 1
            rest = [j for j in range(L) if j not in chosen.tolist()]
            for tokens in _grid(len(chosen)):
                p = lp + float(logp[i, chosen, tokens].sum())
                if last:
                    leaves[(*key, tuple(tokens.tolist()))] = (p, argmax)
                    continue
                for noise in _grid(len(rest)):
                    x = torch.zeros(L, dtype=torch.long)
                    x[chosen], x[rest] = tokens, noise.long()
                    q = p - len(rest) * math.log(V)
                    next_states.append(((*key, tuple(x.tolist())), x, soft[i], argmax, q))
        states = next_states
    return leaves


def trajectory_keys(rollout) -> list[tuple]:
    """Each sampled row's trajectory in the enumeration's key format."""
    trace = rollout.trace
    keys = []
    for b in range(rollout.batch_size):
        steps = trace.active[:, b].nonzero().flatten().tolist()
        canvases = tuple(tuple(trace.canvas[s, b].tolist()) for s in steps)
        last = steps[-1]
        accepted = tuple(trace.tokens[last, b][trace.accepted[last, b]].tolist())
        keys.append((*canvases, accepted))
    return keys


def noise_logprob(rollout) -> torch.Tensor:
    """The parameter-free terms: the uniform start and the renoised positions of every step
    but the last (whose renoising no later step reads)."""
    trace = rollout.trace
    renoised = (~trace.accepted).sum(dim=-1).double() * trace.active  # [S, B]
    last = trace.active.long().cumsum(dim=0).argmax(dim=0)
    renoised[last, torch.arange(rollout.batch_size)] = 0
    return -(L + renoised.sum(dim=0)) * math.log(V)


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_enumerated_probabilities_sum_to_one(model):
    leaves = enumerate_trajectories(model)
    total = sum(math.exp(lp) for lp, _ in leaves.values())
    assert total == pytest.approx(1.0, abs=1e-5)
    lengths = Counter(len(k) - 1 for k in leaves)
    assert len(lengths) > 1  # the adaptive stop fires on some trajectories, not all
    assert max(len(k[-1]) for k in leaves) > 1  # several positions accepted at some steps


def test_sampled_trajectories_have_the_enumerated_likelihood_and_frequencies(model):
    leaves = enumerate_trajectories(model)
    n = 3000
    rollout = StepSampler(CONFIG).generate(model, [PROMPT] * n, seed=7)
    keys = trajectory_keys(rollout)
    expected = torch.tensor([leaves[k][0] for k in keys], dtype=torch.float64)
    sampled = noise_logprob(rollout) + rollout.trace.log_likelihood()
    torch.testing.assert_close(sampled, expected, atol=1e-4, rtol=0)
    views = get_step_objective("tracerl").views(rollout)
    replayed = torch.zeros(n, dtype=torch.float64).index_add(
        0, views.row, step_logprobs(model, rollout, views).double().sum(dim=1)
    )
    torch.testing.assert_close(noise_logprob(rollout) + replayed, expected, atol=1e-4, rtol=0)
    # outputs (the last argmax) and trajectory frequencies against the enumeration
    outputs = Counter(tuple(row.tolist()) for row in rollout.completion_ids)
    by_output: Counter = Counter()
    for lp, out in leaves.values():
        by_output[out] += math.exp(lp)
    _assert_frequencies(outputs, by_output, n)
    top = dict(sorted(((k, math.exp(v[0])) for k, v in leaves.items()), key=lambda kv: -kv[1])[:15])
    counts = Counter(k if k in top else "rest" for k in keys)
    _assert_frequencies(counts, {**top, "rest": 1 - sum(top.values())}, n)


def _assert_frequencies(counts: Counter, probs: dict, n: int) -> None:
    bins = [k for k, p in probs.items() if p * n >= 5]
    other = n - sum(counts[k] for k in bins)
    other_p = 1 - sum(probs[k] for k in bins)
    stat = sum((counts[k] - n * probs[k]) ** 2 / (n * probs[k]) for k in bins)
    if other_p * n >= 5:
        stat += (other - n * other_p) ** 2 / (n * other_p)
        bins = [*bins, "other"]
    assert stat < chi_square_critical(len(bins) - 1), (stat, len(bins))
