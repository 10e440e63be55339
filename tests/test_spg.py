"""SPG against enumeration: its block ELBO is below and its EUBO above the exact log-likelihood
of the block sampler (random order within a block) for every sequence of a toy model, its view
estimates are unbiased for both, and its reweighting gives the shared loss SPG's gradient.

Toy: a nano full-attention model, prompt "ab", completion of 4 tokens in 2 blocks of 2; every
state of the completion (7^4) is forwarded once, directly (no view code).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tiny_rl import read_metrics, rl_config, sevens_task
from toy_tables import logprob_table
from unmask.models import build_char_tokenizer, from_preset
from unmask.objectives import (
    LossInputs,
    Objective,
    get_objective,
    normalizers,
    policy_loss,
    token_logprobs,
)
from unmask.objectives.spg import eubo_estimate
from unmask.sampling import Rollout
from unmask.train.rl import RLTrainer

L, BLOCK = 4, 2
TOKENIZER = build_char_tokenizer(alphabet="ab")
MASK, EOS = TOKENIZER.mask_token_id, TOKENIZER.eos_token_id
PROMPT = TOKENIZER("ab")["input_ids"]
TOKENS = [t for t in range(len(TOKENIZER)) if t != MASK]
BLOCKS = [list(range(k, k + BLOCK)) for k in range(0, L, BLOCK)]
SEQUENCES = [[5, 6, 6, 5], [6, 6, 5, 4], [0, 5, 1, 6]]  # no EOS: the whole completion is scored


@pytest.fixture(scope="module")
def toy():
    model = from_preset("nano-full", tokenizer=TOKENIZER, seed=5).eval()
    with torch.no_grad():
        model.model.model.norm.weight.mul_(30.0)  # sharp, context-dependent distributions
    states = list(itertools.product([MASK, *TOKENS], repeat=L))
    return model, {s: i for i, s in enumerate(states)}, _table(model, states)


def _table(model, states):
    """log pi(token | state) for every state and completion position ``[S, L, V]``."""
    with torch.no_grad():
        return logprob_table(model, states, PROMPT, MASK)


def _reveals(tokens, block):
    """For each order of the block's positions: [(position, state it is revealed from)]."""
    out = []
    for order in itertools.permutations(block):
        visible = {j for j in range(L) if j < block[0]}
        steps = []
        for j in order:
            steps.append((j, tuple(tokens[i] if i in visible else MASK for i in range(L))))
            visible.add(j)
        out.append(steps)
    return out


def exact(table, index, tokens, beta):
    """(log p, block ELBO, EUBO) of a completion under the block sampler, by enumeration."""
    logp = elbo = eubo = 0.0
    for block in BLOCKS:
        orders = _reveals(tokens, block)
        logs = [[table[index[s], j, tokens[j]].item() for j, s in o] for o in orders]
        logp += math.log(sum(math.exp(sum(x)) for x in logs) / len(logs))
        elbo += sum(sum(x) for x in logs) / len(logs)
        for j in block:  # log pi of token j at its reveal, in each order
            at = [x[[pos for pos, _ in o].index(j)] for o, x in zip(orders, logs, strict=True)]
            eubo += math.log(sum(math.exp(beta * v) for v in at) / len(at)) / beta
    return logp, elbo, eubo


def make_rollout(sequences):
    tokens = torch.tensor(sequences)
    return Rollout(
        prompt_ids=torch.tensor([PROMPT] * len(tokens)),
        prompt_mask=torch.ones(len(tokens), len(PROMPT), dtype=torch.bool),
        completion_ids=tokens,
        completion_mask=torch.ones(tokens.shape, dtype=torch.bool),
        steps=torch.zeros(tokens.shape, dtype=torch.long),
        logprobs=None,
        block_length=BLOCK,
        block_align="prompt",
        mask_token_id=MASK,
        nfe=0,
    )


def test_enumerated_block_likelihood_is_a_distribution(toy):
    _, index, table = toy
    total = sum(math.exp(exact(table, index, list(s), 2.0)[0])
                for s in itertools.product(TOKENS, repeat=L))  # fmt: skip
    assert total == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("beta", [2.0, 3.0])
def test_elbo_below_and_eubo_above_the_loglik_for_every_sequence(toy, beta):
    # beta >= block size: Holder then the power-mean inequality make the EUBO an upper bound
    _, index, table = toy
    for tokens in itertools.product([t for t in TOKENS if t != EOS], repeat=L):
        logp, elbo, eubo = exact(table, index, list(tokens), beta)
        assert elbo <= logp + 1e-6 and logp <= eubo + 1e-6, (tokens, elbo, logp, eubo)


def test_below_the_block_size_the_eubo_is_not_a_bound(toy):
    # the paper's beta (1 to 2) drops Theorem 1's constant: a sharpened surrogate, not a bound
    _, index, table = toy
    below = 0
    for tokens in itertools.product([t for t in TOKENS if t != EOS], repeat=L):
        logp, _, eubo = exact(table, index, list(tokens), 1.0)
        below += eubo < logp
    assert below > 0


def test_views_are_block_wise_masks():
    # 3 blocks of 2; EOS at completion position 3: block 2 holds nothing to score
    rollout = make_rollout([[5, 6, 5, EOS, 6, 6]])
    rollout.completion_mask = torch.tensor([[True, True, True, True, False, False]])
    views = get_objective("spg", mc_samples=64).views(rollout, torch.Generator().manual_seed(0))
    start = len(PROMPT)
    for ids, scored, weights in zip(views.input_ids, views.scored, views.weights, strict=True):
        comp, hit = ids[start:] == MASK, scored[start:]
        block = int(hit.nonzero()[0]) // BLOCK
        inside = slice(block * BLOCK, (block + 1) * BLOCK)
        assert not comp[: block * BLOCK].any()  # earlier blocks clean
        assert comp[(block + 1) * BLOCK :].all()  # later blocks (and post-EOS tokens) masked
        assert torch.equal(hit[inside], comp[inside]) and not hit[block * BLOCK + BLOCK :].any()
        m = int(hit.sum())
        assert weights[start:][hit].tolist() == pytest.approx([2 * 2 / (m * 64)] * m)
        assert not (ids[:start] == MASK).any()


def _estimates(model, views, beta):
    """Per rollout: the weighted log-prob sum (ELBO) and, per completion position, E_i."""
    logp = token_logprobs(model, views, micro_batch_size=512)
    elbo = torch.zeros(len(views.canvas.ids)).index_add(
        0, views.rollout_index, (views.weights * logp).sum(dim=1)
    )
    inner = torch.zeros(len(views.canvas.ids), L)
    rows, cols = views.scored.nonzero(as_tuple=True)
    terms = views.weights[rows, cols] * torch.exp(beta * logp[rows, cols])
    inner.index_put_((views.rollout_index[rows], views.completion_index[rows, cols]), terms,
                     accumulate=True)  # fmt: skip
    return elbo, inner


def test_view_estimates_are_unbiased(toy):
    model, index, table = toy
    beta, copies = 1.5, 3000
    rollout = make_rollout([s for s in SEQUENCES for _ in range(copies)])
    views = get_objective("spg", mc_samples=1).views(rollout, torch.Generator().manual_seed(0))
    with torch.no_grad():
        elbo, inner = _estimates(model, views, beta)
    for n, tokens in enumerate(SEQUENCES):
        sample = slice(n * copies, (n + 1) * copies)
        _, exact_elbo, _ = exact(table, index, tokens, beta)
        err = elbo[sample].std().item() / math.sqrt(copies)
        assert abs(elbo[sample].mean().item() - exact_elbo) <= 4 * err
        for block in BLOCKS:
            orders = _reveals(tokens, block)
            for j in block:  # E over the state token j is revealed from of pi^beta
                states = [s for o in orders for pos, s in o if pos == j]
                want = sum(math.exp(beta * table[index[s], j, tokens[j]].item())
                           for s in states) / len(states)  # fmt: skip
                got = inner[sample, j]
                assert abs(got.mean().item() - want) <= 4 * got.std().item() / math.sqrt(copies)


def test_eubo_estimate_matches_its_definition(toy):
    model, *_ = toy
    beta = 1.5
    rollout = make_rollout(SEQUENCES)
    views = get_objective("spg", mc_samples=4).views(rollout, torch.Generator().manual_seed(1))
    logp = token_logprobs(model, views, micro_batch_size=64).detach()
    out = eubo_estimate(views, logp, beta)
    for b in range(len(SEQUENCES)):
        hand, covered = 0.0, 0
        for j in range(L):
            terms = [w * math.exp(beta * lp) for v in range(len(views))
                     for w, lp, s, c in zip(views.weights[v].tolist(), logp[v].tolist(),
                                            views.scored[v].tolist(),
                                            views.completion_index[v].tolist(), strict=True)
                     if int(views.rollout_index[v]) == b and s and c == j]  # fmt: skip
            if terms:
                hand, covered = hand + math.log(sum(terms)) / beta, covered + 1
        assert out.value[b].item() == pytest.approx(hand, abs=1e-5)
        assert out.covered[b].item() == covered
    per_token = torch.zeros(len(SEQUENCES), L).index_put_(
        (views.rollout_index[:, None].expand_as(views.scored)[views.scored],
         views.completion_index[views.scored]), out.weights[views.scored], accumulate=True
    )  # fmt: skip
    torch.testing.assert_close(per_token[per_token > 0], torch.ones(int(out.covered.sum())))


@pytest.mark.parametrize("negative", ["elbo", "eubo", "mix"])
def test_shared_loss_at_ratio_one_has_the_sandwiched_gradient(toy, negative):
    model, *_ = toy
    spg = get_objective("spg", mc_samples=3, negative=negative, eubo_beta=1.5, mix_weight=0.3)
    rollout = make_rollout([*SEQUENCES, [6, 5, 5, 6]])
    advantages = torch.tensor([1.0, -1.0, -0.5, 0.5])
    lengths = rollout.completion_lengths
    divisors = normalizers(rollout, spg.loss_type)
    views = spg.views(rollout, torch.Generator().manual_seed(2))
    param = model.model.model.norm.weight

    model.zero_grad()
    logp = token_logprobs(model, views, micro_batch_size=64)
    adv, weights = spg.reweight(views, logp.detach(), advantages, lengths, 2)
    inputs = LossInputs(logp, logp.detach(), adv, views.scored, weights, views.rollout_index,
                        divisors)  # fmt: skip
    out = policy_loss(inputs)
    out.loss.backward()
    via_loss = param.grad.clone()

    model.zero_grad()
    logp = token_logprobs(model, views, micro_batch_size=64)
    elbo = torch.zeros(4).index_add(0, views.rollout_index, (views.weights * logp).sum(dim=1))
    eubo = eubo_estimate(views, logp, 1.5)
    upper = eubo.value * lengths / eubo.covered
    mix = {"elbo": 0.0, "eubo": 1.0, "mix": 0.3}[negative]
    bound = torch.where(advantages >= 0, elbo, mix * upper + (1 - mix) * elbo)  # Eq. 5
    (-(advantages * bound / divisors).sum()).backward()
    torch.testing.assert_close(via_loss, param.grad, atol=1e-6, rtol=1e-4)
    assert via_loss.abs().sum() > 0


def test_options_are_checked():
    with pytest.raises(ValueError, match="eubo_beta"):
        get_objective("spg", eubo_beta=0.5)
    with pytest.raises(ValueError, match="negative"):
        get_objective("spg", negative="zero")
    with pytest.raises(ValueError, match="mix_weight"):
        get_objective("spg", mix_weight=1.5)


@pytest.mark.skipif(
    not hasattr(Objective, "ratio_free"), reason="needs the trainer's ratio-free hook (issue 22)"
)
def test_raises_a_toy_reward_in_the_trainer(tmp_path):
    cfg = rl_config(tmp_path, objective="spg", max_steps=10, num_prompts=4, lr=3e-3)
    RLTrainer(cfg, task=sevens_task()).train()
    rewards = [m["reward"] for m in read_metrics(tmp_path / "run")]
    assert sum(rewards[-3:]) / 3 > 0.1 > 3 * rewards[0], rewards
