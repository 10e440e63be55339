"""Tests for the three bugs mutation testing left undetected (issue 22, part 3).

* The distribution log-probs are computed at: one trainer step per objective samples at
  temperature 0.7 with top-k 3; on the first pass trace objectives score exactly the sampler's
  log-probs, the others the denoiser at temperature 1, and every ratio is exactly 1.
* Asymmetric clipping (``epsilon != epsilon_high``) with values where swapping the low and the
  high bound changes the loss, its gradient and the clip metrics; and the trainer passes both.
* ``num_iterations = 2``: every pass's old log-probs are those of the pre-update policy on that
  pass's own views (a pass reusing pass 0's old log-probs scores other masks).

The trainer is observed through the names it calls (``token_logprobs``, ``policy_loss``), its
sampler and its optimizer; nothing in it is replaced.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch

import unmask.train.view_updates as view_updates
from tiny_rl import rl_config, sevens_task
from unmask.objectives import OBJECTIVES, ViewBatch, policy_loss, token_logprobs
from unmask.objectives.loss import ClipConfig, LossInputs
from unmask.sampling import Rollout, Sampler, SamplerConfig
from unmask.train.rl import RLTrainer

SAMPLING = {"temperature": 0.7, "top_k": 3, "top_p": 1.0}
EPSILON, EPSILON_HIGH = 0.1, 0.3


@dataclass
class Scored:
    """One micro-batch the trainer trained on: its views, the policy's log-probs (detached),
    the old log-probs and the loss call's clipping settings, and the pass it belongs to."""

    views: ViewBatch
    logp: torch.Tensor
    old: torch.Tensor
    clip: ClipConfig
    metrics: dict[str, torch.Tensor]
    iteration: int


@dataclass
class Step:
    trainer: RLTrainer
    before: Any  # the policy before the step's first update
    rollout: Rollout | None = None
    scored: list[Scored] = field(default_factory=list)


_steps: dict[str, Step] = {}


def run_step(name: str, tmp_path_factory, monkeypatch) -> Step:
    """One trainer step of objective ``name`` (cached: tests share it), recorded."""
    if name in _steps:
        return _steps[name]
    cfg = rl_config(
        tmp_path_factory.mktemp(name), objective=name, max_steps=1, num_iterations=2,
        epsilon=EPSILON, epsilon_high=EPSILON_HIGH,
        sampler=SamplerConfig(gen_length=8, **SAMPLING),
    )  # fmt: skip
    trainer = RLTrainer(cfg, task=sevens_task())
    # the sampler also returns its log-probs, the reference for the trace objectives
    trainer.sampler = Sampler(replace(trainer.sampler.config, return_logprobs=True))
    step = Step(trainer, copy.deepcopy(trainer.core).eval())
    generate, optimizer_step = trainer.sampler.generate, trainer.optimizer.step
    pending: list[tuple[ViewBatch, torch.Tensor]] = []
    iteration = [0]

    def sample(*args, **kwargs):
        step.rollout = generate(*args, **kwargs)
        return step.rollout

    def spy_logprobs(model, views, *args, **kwargs):
        out = token_logprobs(model, views, *args, **kwargs)
        if torch.is_grad_enabled():  # the policy's scoring of a micro-batch it trains on
            logp = out[0] if isinstance(out, tuple) else out
            pending.append((views, logp.detach()))
        return out

    def spy_loss(inputs, clip):
        out = policy_loss(inputs, clip)
        views, logp = pending.pop()
        assert torch.equal(logp, inputs.logprobs.detach())
        step.scored.append(
            Scored(views, logp, inputs.old_logprobs.detach(), clip, out.metrics, iteration[0])
        )
        return out

    def counted_step(*args, **kwargs):
        iteration[0] += 1
        return optimizer_step(*args, **kwargs)

    trainer.sampler.generate = sample
    trainer.optimizer.step = counted_step
    with monkeypatch.context() as patch:
        patch.setattr(view_updates, "token_logprobs", spy_logprobs)
        patch.setattr(view_updates, "policy_loss", spy_loss)
        trainer.train()
    assert {s.iteration for s in step.scored} == {0, 1}, "expected two passes"
    _steps[name] = step
    return step


@pytest.fixture(params=sorted(OBJECTIVES))
def step(request, tmp_path_factory, monkeypatch):
    return run_step(request.param, tmp_path_factory, monkeypatch)


def _on(scored: Scored, values: torch.Tensor) -> torch.Tensor:
    return values[scored.views.scored]


def test_first_pass_scores_the_sampling_distribution_with_ratio_one(step):
    objective, rollout = step.trainer.objective, step.rollout
    for s in (s for s in step.scored if s.iteration == 0):
        if objective.scores_sampling_distribution:  # trace replays: the sampler's own log-probs
            expected = s.views.per_token(objective.sampler_logprobs(rollout))
        else:  # the denoiser itself, at temperature 1
            with torch.no_grad():
                expected = token_logprobs(step.before, s.views, len(s.views))
        torch.testing.assert_close(_on(s, s.logp), _on(s, expected), atol=2e-5, rtol=0)
        ratio = torch.exp(_on(s, s.logp) - _on(s, s.old))
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=5e-5, rtol=0)
        for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert s.metrics[key].item() == 0.0, key


def test_the_trainer_passes_both_clip_bounds(step):
    for s in step.scored:
        assert (s.clip.epsilon, s.clip.epsilon_high) == (EPSILON, EPSILON_HIGH)


@pytest.mark.parametrize("name", sorted(n for n, c in OBJECTIVES.items() if not c.ratio_free))
def test_every_pass_uses_its_own_old_logprobs(name, tmp_path_factory, monkeypatch):
    step = run_step(name, tmp_path_factory, monkeypatch)
    objective, rollout = step.trainer.objective, step.rollout
    kwargs = SAMPLING if objective.scores_sampling_distribution else {}
    for s in (s for s in step.scored if s.iteration == 1):
        if objective.old_logprobs == "sampler":
            expected = s.views.per_token(objective.sampler_logprobs(rollout))
        else:  # the pre-update policy on this pass's views
            with torch.no_grad():
                expected = token_logprobs(step.before, s.views, len(s.views), **kwargs)
        torch.testing.assert_close(_on(s, s.old), _on(s, expected), atol=2e-5, rtol=0)


# Asymmetric clipping: epsilon 0.2, epsilon_high 0.28, so the ratio range is [0.8, 1.28].
# Token 1: ratio 0.75, A = -1 (clipped low; swapped bounds [0.72, 1.2] would not clip it).
# Token 2: ratio 1.25, A = 2 (inside; swapped bounds would clip it high).
RATIOS, ADVANTAGES = [0.75, 1.25], [-1.0, 2.0]


def _asymmetric(level: str):
    old = torch.tensor([[-1.0, -2.0]])
    if level == "token":
        new = old + torch.log(torch.tensor([RATIOS]))
        views = dict(scored=torch.ones(1, 2, dtype=torch.bool), rollout_index=torch.tensor([0]))
        advantages = torch.tensor([ADVANTAGES])
        divisors = torch.tensor([2.0])
    else:  # one rollout per token: the sequence ratio is the token's ratio
        old = old.T
        new = old + torch.log(torch.tensor([RATIOS])).T
        views = dict(scored=torch.ones(2, 1, dtype=torch.bool), rollout_index=torch.tensor([0, 1]))
        advantages = torch.tensor(ADVANTAGES)
        divisors = torch.tensor([2.0, 2.0])
    new.requires_grad_()
    inputs = LossInputs(
        new, old, advantages, views["scored"], torch.ones(new.shape), views["rollout_index"],
        divisors, lengths=torch.tensor([1, 1]),
    )  # fmt: skip
    out = policy_loss(inputs, ClipConfig(epsilon=0.2, epsilon_high=0.28, level=level))
    out.loss.backward()
    return out, new.grad.flatten()


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_asymmetric_clip_bounds_are_not_swapped(level):
    out, grad = _asymmetric(level)
    # -min(r A, clip(r, 0.8, 1.28) A): 0.8 (clipped, no gradient) and -2.5 (gradient -A r / 2)
    assert out.loss.item() == pytest.approx((0.8 - 2.5) / 2, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([0.0, -2.0 * 1.25 / 2]))
    assert out.metrics["clip_ratio/low_mean"].item() == pytest.approx(0.5)
    assert out.metrics["clip_ratio/high_mean"].item() == 0.0


def test_lora_dropout_does_not_move_the_first_pass_ratio(tmp_path, monkeypatch):
    """LoRA's dropout (0.05 by default) must be off while the policy is scored: the sampler's
    old log-probs come from eval mode, so with dropout on the first-pass ratios of AGRPO were
    0.54-1.24 instead of 1."""
    from unmask.models.lora import LoRAConfig

    cfg = rl_config(
        tmp_path, objective="agrpo", max_steps=1, lora=LoRAConfig(r=4, dropout=0.3),
        sampler=SamplerConfig(gen_length=8, **SAMPLING),
    )  # fmt: skip
    trainer = RLTrainer(cfg, task=sevens_task())
    with torch.no_grad():  # adapters that change the output, so dropout would show
        for name, param in trainer.core.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    ratios: list[torch.Tensor] = []

    def spy_loss(inputs, clip):
        ratios.append(torch.exp(inputs.logprobs - inputs.old_logprobs).detach()[inputs.scored])
        return policy_loss(inputs, clip)

    monkeypatch.setattr(view_updates, "policy_loss", spy_loss)
    trainer.train()
    ratio = torch.cat(ratios)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=5e-5, rtol=0)
