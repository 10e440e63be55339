"""Every recipe loads, and the one RL recipe runs every objective by ``objective=NAME``: an
objective's options are checked when the config is read, before a model loads."""

from __future__ import annotations

import pytest

from repo_root import CONFIGS
from unmask.config import ConfigError, load_config
from unmask.objectives import OBJECTIVES
from unmask.train.rl_config import RLConfig

RL_RECIPE = CONFIGS / "rl_sudoku_tiny.yaml"


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_the_rl_recipe_takes_every_objective_with_its_defaults(name):
    cfg = load_config(RLConfig, RL_RECIPE, [f"objective={name}"])
    assert cfg.objective == name and cfg.objective_options == {}


def test_a_wrong_objective_option_fails_when_the_config_is_read():
    with pytest.raises(ConfigError, match="shrink"):
        load_config(RLConfig, RL_RECIPE, ["objective=agrpo", "objective_options.shrink=2"])


def test_the_objective_brings_its_own_trainer_defaults():
    from unmask.train.rl_config import objective_settings

    cfg = load_config(RLConfig, RL_RECIPE, ["objective=wd1"])
    settings = objective_settings(cfg, OBJECTIVES["wd1"])
    assert (settings.num_iterations, settings.scale_rewards) == (8, "none")
    cfg = load_config(RLConfig, RL_RECIPE, ["objective=wd1", "num_iterations=2"])
    assert objective_settings(cfg, OBJECTIVES["wd1"]).num_iterations == 2
