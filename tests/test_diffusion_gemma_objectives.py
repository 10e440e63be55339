"""RL on DiffusionGemma traces: replayed log-probs equal the sampler's, AGRPO's step sampling
is unbiased for the full trace, gradients flow, and a few RL steps raise a toy reward."""

from __future__ import annotations

import copy

import pytest
import torch

from gemma_models import char_gemma, sharpened
from unmask.models.diffusion_gemma import gemma_preset
from unmask.objectives.advantages import group_advantages
from unmask.objectives.loss import ClipConfig
from unmask.objectives.step_loss import backward_step_loss
from unmask.objectives.step_objectives import get_step_objective
from unmask.objectives.step_replay import step_logprobs, step_normalizers
from unmask.sampling.step_sampler import StepSampler, StepSamplerConfig

PROMPTS = ["12+3=", "4*5=", "hello", "abc"]
CONFIG = StepSamplerConfig(
    max_new_tokens=24, max_denoising_steps=6, entropy_bound=0.5, confidence_threshold=1.0,
    seed=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return char_gemma()


@pytest.fixture(scope="module")
def rollout(model):
    return StepSampler(CONFIG).generate(model, PROMPTS)


@pytest.mark.parametrize("per_batch", [1, 4])
def test_replayed_logprobs_equal_the_samplers(model, rollout, per_batch):
    views = get_step_objective("tracerl").views(rollout)
    assert len(views) == int(rollout.trace.scored.any(dim=-1).sum())
    with torch.no_grad():
        for mb in views.micro_batches(per_batch):
            replayed = step_logprobs(model, rollout, mb)
            torch.testing.assert_close(replayed, mb.sampler_logprobs(rollout.trace), atol=2e-5,
                                       rtol=0)  # fmt: skip


def test_agrpo_step_sampling_is_unbiased_for_the_full_trace(rollout):
    """E[sum of weights * x] over draws equals the sum of x over all steps (x: any per-step
    value; here the steps' summed sampler log-probs)."""
    trace = rollout.trace
    per_step = torch.where(trace.scored, trace.logprobs.double(), 0.0).sum(dim=-1)  # [S, B]
    full = per_step.sum(dim=0)
    for sampling in ("uniform", "surprisal"):
        objective = get_step_objective("agrpo", mc_samples=3, step_sampling=sampling)
        total = torch.zeros_like(full)
        draws = 400
        for seed in range(draws):
            views = objective.views(rollout, torch.Generator().manual_seed(seed))
            total.index_add_(0, views.row, views.weight * per_step[views.step, views.row])
        torch.testing.assert_close(total / draws, full, rtol=0.03, atol=0.0)


def test_steps_normalisation_counts_denoising_steps(rollout):
    divisors = step_normalizers(rollout, "steps")
    steps = rollout.trace.scored.any(dim=-1).sum(dim=0)
    torch.testing.assert_close(divisors, (len(steps) * steps).float())
    assert torch.isinf(step_normalizers(rollout, "steps", kept=torch.tensor([1, 0, 1, 1]))[1])


def test_gradient_flows_and_on_policy_ratio_is_one(model, rollout):
    policy = copy.deepcopy(model)
    views = get_step_objective("agrpo", mc_samples=2).views(rollout, torch.Generator())
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    divisors = step_normalizers(rollout, "steps")
    metrics = backward_step_loss(
        policy, rollout, views, advantages, divisors, model, clip=ClipConfig(beta=0.1)
    )
    assert metrics["clip_ratio/region_mean"] == 0.0 and metrics["kl"] == pytest.approx(0, abs=1e-6)
    grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    assert any("self_conditioning" in n for n in grads)  # the block reading the stored input
    assert any("experts" in n for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_unknown_objectives_and_options_are_refused():
    with pytest.raises(ValueError, match="objective with a per-step form"):
        get_step_objective("diffu_grpo")
    with pytest.raises(ValueError, match="unknown options"):
        get_step_objective("agrpo", shrink=2)


def digits(texts: list[str]) -> torch.Tensor:
    """Toy reward: the fraction of digits (a random model writes about 10%)."""
    return torch.tensor([sum(c.isdigit() for c in t) / max(len(t), 1) for t in texts])


@pytest.mark.parametrize("name", ["tracerl", "agrpo"])
def test_a_few_rl_steps_raise_a_toy_reward(name):
    """A self-contained GRPO loop on the shared advantages and loss (the RL trainer runs
    the same pieces: tests/test_diffusion_gemma_rl.py). The random model is sharpened: the
    output is the last step's argmax, which the policy gradient moves only through the
    accepted tokens, so they must track it (as in a trained model, whose last steps are
    confident; see docs/objectives.md)."""
    model = sharpened(gemma_preset("diffusion-gemma-nano", canvas_length=8), 10.0)
    model.model.generation_config.eos_token_id = None
    sampler = StepSampler(
        StepSamplerConfig(max_new_tokens=8, max_denoising_steps=4, entropy_bound=0.5)
    )
    objective = get_step_objective(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    prompts, group = ["1+1=", "2+2="], 8
    rewards = []
    for step in range(15):
        rollout = sampler.generate(model, [p for p in prompts for _ in range(group)], seed=step)
        reward = digits(rollout.completion_texts(model.tokenizer))
        rewards.append(float(reward.mean()))
        adv = group_advantages(reward, group, scale_rewards="group")
        views = objective.views(rollout, torch.Generator().manual_seed(step))
        divisors = step_normalizers(rollout, objective.loss_type, adv.kept)
        backward_step_loss(model, rollout, views, adv.advantages, divisors, rollouts_per_batch=8)
        optimizer.step()
        optimizer.zero_grad()
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards
