"""Process rewards: a reward function returning one number per completion token reaches the
value model's GAE token by token, and counts as its sum everywhere else."""

from __future__ import annotations

import logging

import pytest
import torch

from unmask.objectives.value import ValueConfig
from unmask.rewards.process import check_vectors, split_rewards
from unmask.sampling import SamplerConfig
from unmask.tasks.registry import get_task
from unmask.train.rl import RLTrainer
from unmask.train.rl_config import RLConfig


def per_token(prompts, completions, completion_ids, completion_steps, **_):
    """0.1 * (token id mod 3) on each token, plus 1 on the tokens of the first step."""
    return [[0.1 * (t % 3) + (s == 0) for t, s in zip(ids, steps, strict=True)]
            for ids, steps in zip(completion_ids, completion_steps, strict=True)]  # fmt: skip


def length(prompts, completions, **_):
    return [len(c) / 10 for c in completions]


def _task():
    solved = get_task("sudoku").reward_funcs[1]
    return get_task("sudoku", reward_funcs=[per_token, length, solved],
                    reward_weights=[2.0, 1.0, 0.0])  # fmt: skip


def _trainer(tmp_path, **kw):
    cfg = RLConfig(model="nano-block", output_dir=str(tmp_path / "run"), num_prompts=2,
                   num_generations=4, max_steps=1, lr=1e-3, progress=False, plots=False,
                   sampler=SamplerConfig(gen_length=8, temperature=1.0), **kw)  # fmt: skip
    trainer = RLTrainer(cfg, task=_task())
    seen: dict[str, torch.Tensor] = {}
    optimize = trainer._optimize

    def spy(rollout, advantages, kept):
        seen.update(rollout=rollout, advantages=advantages.clone(), kept=kept.clone())
        return optimize(rollout, advantages, kept)

    trainer._optimize = spy
    return trainer, seen


def _vectors(rollout, tokenizer):
    mask = rollout.completion_mask.bool()
    ids = [row[m].tolist() for row, m in zip(rollout.completion_ids, mask, strict=True)]
    steps = [row[m].tolist() for row, m in zip(rollout.steps, mask, strict=True)]
    texts = rollout.completion_texts(tokenizer)
    return per_token(None, texts, ids, steps), length(None, texts)


def test_without_a_value_model_a_vector_counts_as_its_sum(tmp_path):
    trainer, seen = _trainer(tmp_path, scale_rewards="none")
    metrics = trainer.step()
    rollout = seen["rollout"]
    vectors, lengths = _vectors(rollout, trainer.tokenizer)
    totals = torch.tensor([2 * sum(v) + s for v, s in zip(vectors, lengths, strict=True)])
    groups = totals.view(-1, 4)
    expected = (groups - groups.mean(dim=1, keepdim=True)).flatten()
    assert seen["advantages"].shape == (8,)
    torch.testing.assert_close(seen["advantages"], expected, atol=1e-5, rtol=0)
    assert metrics["reward/per_token/mean"] == pytest.approx(sum(map(sum, vectors)) / 8, abs=1e-5)


def test_per_token_rewards_reach_the_token_advantages(tmp_path):
    value = ValueConfig(enabled=True, lr=1e-3, gamma=1.0, lam=1.0, reward="raw")
    trainer, seen = _trainer(tmp_path, value_model=value)
    trainer.step()  # the value head starts at zero: A_j = r_j + the step rewards after j's step
    rollout, advantages = seen["rollout"], seen["advantages"]
    vectors, lengths = _vectors(rollout, trainer.tokenizer)
    assert advantages.shape == rollout.completion_ids.shape
    mask = rollout.completion_mask.bool()
    for b in range(rollout.batch_size):
        steps = rollout.steps[b][mask[b]]
        r = 2 * torch.tensor(vectors[b])
        last = steps == steps.max()
        r[last] += lengths[b]  # the scalar reward is the outcome, on the last step's tokens
        step_reward = {int(s): float(r[steps == s].mean()) for s in steps.unique()}
        expected = torch.tensor([float(r[j]) + sum(v for s, v in step_reward.items() if s > t)
                                 for j, t in enumerate(steps.tolist())])  # fmt: skip
        torch.testing.assert_close(advantages[b][mask[b]], expected, atol=1e-5, rtol=0)
        assert (advantages[b][~mask[b]] == 0).all()


def test_malformed_vectors_leave_their_completion_out(caplog):
    scores = {"a": [[1.0, 2.0], [1.0], [float("nan")], 0.5, None]}
    with caplog.at_level(logging.WARNING):
        checked = check_vectors(scores, [2, 2, 1, 3, 3])
    assert checked["a"] == [[1.0, 2.0], None, None, 0.5, None]
    assert "completion 1 needs 2 finite per-token values, got 1" in caplog.text
    task = get_task("sudoku")
    scores = {"sudoku_cells": [[0.5, 0.25], 1.0], "sudoku_solved": [1.0, None]}
    assert task.weighted_sum(scores) == [1.75, 1.0]


def test_split_rewards_keeps_vectors_per_token():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    scores = {"v": [[1.0, 2.0], None], "s": [0.5, None]}
    outcome, process = split_rewards(scores, ["v", "s"], [2.0, 1.0], mask)
    assert outcome == [0.5, None]
    assert process.tolist() == [[2.0, 4.0, 0.0], [0.0, 0.0, 0.0]]
    assert split_rewards({"s": [1.0, 2.0]}, ["s"], [1.0], mask) == ([1.0, 2.0], None)


def test_reward_none_takes_the_task_vectors_alone_and_fails_clearly_without_them(tmp_path):
    value = ValueConfig(enabled=True, lr=1e-3, gamma=1.0, lam=1.0, reward="none")
    trainer, seen = _trainer(tmp_path, value_model=value)
    trainer.step()  # zero value head, no outcome: A_j = r_j + the later steps' mean rewards
    rollout, advantages = seen["rollout"], seen["advantages"]
    vectors, _ = _vectors(rollout, trainer.tokenizer)
    mask = rollout.completion_mask.bool()
    for b in range(rollout.batch_size):
        steps = rollout.steps[b][mask[b]]
        r = 2 * torch.tensor(vectors[b])
        step_reward = {int(s): float(r[steps == s].mean()) for s in steps.unique()}
        expected = torch.tensor([float(r[j]) + sum(v for s, v in step_reward.items() if s > t)
                                 for j, t in enumerate(steps.tolist())])  # fmt: skip
        torch.testing.assert_close(advantages[b][mask[b]], expected, atol=1e-5, rtol=0)

    plain = RLConfig(model="nano-block", output_dir=str(tmp_path / "plain"), num_prompts=2,
                     num_generations=4, max_steps=1, progress=False, plots=False,
                     sampler=SamplerConfig(gen_length=8, temperature=1.0),
                     value_model=value)  # fmt: skip
    with pytest.raises(ValueError, match=r"value_model\.reward: none leaves the value model"):
        RLTrainer(plain, task=get_task("sudoku")).step()
