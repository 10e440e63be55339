"""The value model inside ``unmask rl``: metrics, checkpoints that resume exactly, process
rewards, both layouts, and clear errors."""

from __future__ import annotations

import sys
import types

import pytest

from repo_root import CONFIGS
from tiny_rl import assert_same_weights, read_metrics, rl_config, sevens_task
from unmask.objectives.value import ValueConfig, ValueModel
from unmask.sampling import SamplerConfig
from unmask.train.checkpoint import CheckpointError, latest_checkpoint
from unmask.train.rl import RLTrainer
from unmask.train.rl_config import RLConfig


def _config(tmp_path, name="run", value=None, **kw):
    """A tiny run with the value model on (``value``: its fields)."""
    value_model = ValueConfig(enabled=True, lr=1e-3, **(value or {}))
    return rl_config(tmp_path, name, **{"max_steps": 3, "value_model": value_model, **kw})


def test_value_run_logs_saves_and_resumes_exactly(tmp_path):
    straight = RLTrainer(_config(tmp_path, "straight", save_every=2), task=sevens_task())
    straight.train()
    logged = read_metrics(tmp_path / "straight")
    for key in ("value_loss", "value_clip_ratio", "value_explained_var", "advantage_std"):
        assert key in logged[-1], key
    assert logged[0]["value_mean"] == 0  # zero-initialised head
    assert logged[-1]["value_mean"] != 0  # the value model was trained
    saved = ValueModel.from_pretrained(tmp_path / "straight" / "final_value", "float32", "cpu")
    assert_same_weights(straight.value.core, saved)

    checkpoint = latest_checkpoint(tmp_path / "straight")  # after step 2 of 3
    assert checkpoint.name.endswith("2") and (checkpoint / "value_model" / ".metadata").is_file()
    resumed = RLTrainer(_config(tmp_path, "resumed", resume=str(checkpoint)), task=sevens_task())
    resumed.train()
    assert_same_weights(straight.core, resumed.core)
    assert_same_weights(straight.value.core, resumed.value.core)
    assert read_metrics(tmp_path / "resumed")[-1]["value_loss"] == logged[-1]["value_loss"]


def test_full_layout_agrpo_process_reward_and_train_every(tmp_path, monkeypatch):
    module = types.ModuleType("value_test_rewards")

    def per_token(prompts, completions, completion_ids, **_):
        return [[0.1 * (tok % 3) for tok in ids] for ids in completion_ids]

    module.per_token = per_token
    monkeypatch.setitem(sys.modules, "value_test_rewards", module)
    value = {
        "gamma": 0.9,
        "lam": 0.95,
        "whiten": True,
        "reward": "raw",
        "token_reward": "value_test_rewards:per_token",
        "train_every": 2,
    }
    cfg = _config(tmp_path, model="nano-full", objective="agrpo", max_steps=2, value=value,
                  sampler=SamplerConfig(gen_length=8, block_length=4, temperature=1.0))  # fmt: skip
    RLTrainer(cfg, task=sevens_task()).train()
    first, second = read_metrics(tmp_path / "run")
    assert "value_loss" not in first and "value_loss" in second  # trained every 2nd step
    assert first["advantage_mean"] == pytest.approx(0.0, abs=1e-5)  # whitened
    assert first["advantage_std"] == pytest.approx(1.0, abs=1e-3)
    assert first["value_return_mean"] != 0


def test_value_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="value_model needs an objective"):
        _config(tmp_path, objective="coupled")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        _config(tmp_path, importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="cannot import"):
        RLTrainer(_config(tmp_path, value={"token_reward": "no_such_module:f"}), task=sevens_task())
    plain = _config(tmp_path, "plain", max_steps=1, save_every=1, value_model=ValueConfig())
    RLTrainer(plain, task=sevens_task()).train()
    with pytest.raises(CheckpointError, match="without a value model"):
        RLTrainer(_config(tmp_path, "plain", resume="latest"), task=sevens_task()).train()


def test_value_advantages_raise_a_toy_reward(tmp_path):
    cfg = _config(tmp_path, max_steps=10, num_prompts=4, lr=1e-2)
    RLTrainer(cfg, task=sevens_task()).train()
    rewards = [m["reward"] for m in read_metrics(tmp_path / "run")]
    assert sum(rewards[-3:]) / 3 > 0.1 > 3 * rewards[0], rewards


def test_recipe_loads_and_overrides_are_checked():
    from unmask.config import ConfigError, load_config

    recipe = CONFIGS / "rl_value_sudoku_tiny.yaml"
    cfg = load_config(RLConfig, recipe, ["value_model.lam=0.95"])
    assert cfg.value_model.enabled and cfg.value_model.lam == 0.95
    with pytest.raises(ConfigError, match=r"value_model\.gamma"):
        load_config(RLConfig, recipe, ["value_model.gamma=2"])
    with pytest.raises(ConfigError, match=r"value_model\.reward"):
        load_config(RLConfig, recipe, ["value_model.reward=sum"])


def test_a_non_finite_value_update_is_skipped_by_the_trainers_machinery(tmp_path, monkeypatch):
    import unmask.train.value_learner as learner
    from unmask.train.update import Updater

    real = learner.value_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    trainer = RLTrainer(_config(tmp_path, max_steps=2), task=sevens_task())
    assert isinstance(trainer.value.updater, Updater)  # skips decided over all processes
    before = {k: v.clone() for k, v in trainer.value.core.state_dict().items()}
    monkeypatch.setattr(learner, "value_loss", poisoned)
    trainer.train()
    for name, value in trainer.value.core.state_dict().items():  # no NaN reached the weights
        assert value.equal(before[name]), name
    assert [m["value_skipped_updates"] for m in read_metrics(tmp_path / "run")] == [1, 1]
    assert "skipped_updates" not in read_metrics(tmp_path / "run")[-1]  # the policy trained
