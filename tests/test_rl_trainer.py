"""The RL loop: it learns, resumes exactly (a resume with no checkpoint yet starts over),
survives unscorable rewards and non-finite updates."""

from __future__ import annotations

import pytest
import torch

from repo_root import CONFIGS
from tiny_rl import assert_same_weights, read_metrics, rl_config, sevens_task, untimed
from unmask.sampling import SamplerConfig
from unmask.tasks.registry import get_task
from unmask.train.checkpoint import latest_checkpoint
from unmask.train.rl import RLTrainer
from unmask.train.rl_config import RLConfig


def test_tracerl_raises_a_toy_reward(tmp_path):
    cfg = rl_config(tmp_path, max_steps=10, num_prompts=4, lr=1e-2)
    RLTrainer(cfg, task=sevens_task()).train()
    rewards = [m["reward"] for m in read_metrics(tmp_path / "run")]
    assert sum(rewards[-3:]) / 3 > 0.1 > 3 * rewards[0], rewards


@pytest.mark.parametrize("objective", ["agrpo", "coupled", "elbo"])
def test_objectives_run_in_the_loop(tmp_path, objective):
    cfg = rl_config(tmp_path, objective=objective, max_steps=2, num_iterations=2, beta=0.05)
    final = RLTrainer(cfg, task=sevens_task()).train()
    assert (final / "model.safetensors").exists()
    last = read_metrics(tmp_path / "run")[-1]
    for key in (
        "reward",
        "reward_std",
        "reward/sevens/mean",
        "kl",
        "clip_ratio",
        "entropy",
        "completions/mean_length",
        "frac_reward_zero_std",
        "nfe",
        "tokens_per_step",
    ):
        assert key in last, key
    assert last["kl"] >= 0


def test_resume_continues_exactly(tmp_path):
    # logged at steps 3 and 4, saved at 2: the first line after the resume is off the save step
    cfg = rl_config(tmp_path, "straight", max_steps=4, log_every=3)
    straight = RLTrainer(cfg, task=sevens_task())
    straight.train()
    cfg = rl_config(tmp_path, "resumed", max_steps=4, save_every=2, log_every=3)
    first = RLTrainer(cfg, task=sevens_task())
    step = first.step

    def interrupted():  # killed while sampling step 3, after step 2's checkpoint
        if first.steps_done == 2:
            raise KeyboardInterrupt
        return step()

    first.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert latest_checkpoint(tmp_path / "resumed").name.endswith("2")
    cfg = rl_config(tmp_path, "resumed", max_steps=4, log_every=3, resume="latest")
    resumed = RLTrainer(cfg, task=sevens_task())
    resumed.train()
    assert_same_weights(straight.core, resumed.core)
    # every logged value but the wall-clock ones (``*_s``) is exactly equal
    lines = [untimed(read_metrics(tmp_path / n)) for n in ("straight", "resumed")]
    assert [m["step"] for m in lines[1]] == [3, 4]
    assert lines[0] == lines[1]


def test_resume_without_a_checkpoint_starts_from_step_0(tmp_path, caplog):
    cfg = rl_config(tmp_path, max_steps=1, resume="latest")
    assert RLTrainer(cfg, task=sevens_task()).train().is_dir()
    assert "no checkpoint in" in caplog.text
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1]


def test_unscorable_rewards_are_left_out(tmp_path, caplog):
    def flaky(prompts, completions, **_):
        return [None if i % 2 else 0.0 for i in range(len(completions))]

    def broken(prompts, completions, **_):
        raise RuntimeError("reward server down")

    def only_some(prompts, completions, **_):
        return [1.0 if i == 0 else None for i in range(len(completions))]

    solved = get_task("sudoku").reward_funcs[1]
    task = get_task(
        "sudoku",
        reward_funcs=[only_some, flaky, broken, solved],
        reward_weights=[1.0, 1.0, 1.0, 0.0],
    )
    trainer = RLTrainer(rl_config(tmp_path, max_steps=2), task=task)
    before = {k: v.clone() for k, v in trainer.core.state_dict().items()}
    trainer.train()
    for name, value in trainer.core.state_dict().items():  # nothing was trained on
        assert torch.equal(value, before[name]), name
    last = read_metrics(tmp_path / "run")[-1]
    assert last["reward_unscored"] == 8  # `broken` raised: no sample is fully scored
    assert "could not be scored" in caplog.text and "broken" in caplog.text


def test_non_finite_updates_are_skipped_then_stop(tmp_path, monkeypatch):
    import unmask.train.view_updates as view_updates

    real = view_updates.policy_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    trainer = RLTrainer(
        rl_config(tmp_path, max_steps=6, save_every=1, max_bad_steps=2), task=sevens_task()
    )
    before = {k: v.clone() for k, v in trainer.core.state_dict().items()}
    monkeypatch.setattr(view_updates, "policy_loss", poisoned)
    with pytest.raises(RuntimeError, match="non-finite"):
        trainer.train()
    for name, value in trainer.core.state_dict().items():  # no NaN reached the weights
        assert torch.equal(value, before[name]), name
    assert latest_checkpoint(tmp_path / "run") is not None
    assert read_metrics(tmp_path / "run")[-1]["skipped_updates"] == 1


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="num_generations"):
        rl_config(tmp_path, num_generations=1)
    with pytest.raises(ValueError, match="temperature"):
        rl_config(tmp_path, sampler=SamplerConfig(temperature=0.0))
    with pytest.raises(ValueError, match="unknown objective"):
        RLTrainer(rl_config(tmp_path, objective="ppo"), task=sevens_task())


def test_bad_objective_options_fail_before_any_model_loads(tmp_path):
    from unmask.config import ConfigError, from_dict

    with pytest.raises(ValueError, match=r"objective 'tracerl' has no option\(s\) \['nope'\]"):
        rl_config(tmp_path, objective_options={"nope": 1})
    with pytest.raises(ConfigError, match="nope"):  # what the CLI reports as a config error
        from_dict(RLConfig, {"objective": "spg", "objective_options": {"nope": 1}})


def test_null_settings_are_the_objectives_own(tmp_path):
    from unmask.objectives import OBJECTIVES

    spg = OBJECTIVES["spg"]
    trainer = RLTrainer(rl_config(tmp_path, objective="spg"), task=sevens_task())
    assert trainer.settings.num_iterations == spg.num_iterations
    assert trainer.settings.scale_rewards == spg.scale_rewards
    assert trainer.settings.loss_type == spg.loss_type
    cfg = rl_config(tmp_path, "set", objective="spg", num_iterations=1, scale_rewards="group")
    settings = RLTrainer(cfg, task=sevens_task()).settings
    assert (settings.num_iterations, settings.scale_rewards) == (1, "group")


def test_resume_on_other_data_is_refused(tmp_path):
    RLTrainer(rl_config(tmp_path, max_steps=1, save_every=1), task=sevens_task()).train()
    other = get_task("sudoku", num_train=10)
    with pytest.raises(ValueError, match="resume with the same data"):
        RLTrainer(rl_config(tmp_path, max_steps=2, resume="latest"), task=other).train()


def test_rl_cli_runs_a_recipe_and_resumes(tmp_path, capsys):
    from unmask.cli import main

    args = [
        "rl",
        str(CONFIGS / "rl_sudoku_tiny.yaml"),
        "objective=agrpo",
        "model=nano-block",
        f"output_dir={tmp_path / 'cli'}",
        "max_steps=2",
        "save_every=1",
        "num_prompts=2",
        "num_generations=2",
        "sampler.gen_length=8",
        "eval.every=0",
        "progress=false",
    ]
    assert main(args) == 0
    assert "final model" in capsys.readouterr().out
    assert main(args) == 2  # the folder has checkpoints: refused without --resume
    assert "resume" in capsys.readouterr().err
    assert main([*args, "max_steps=3", "--resume"]) == 0
    assert main(["rl", str(CONFIGS / "rl_sudoku_tiny.yaml"), "lr=fast"]) == 2
    assert "lr must be a number" in capsys.readouterr().err
