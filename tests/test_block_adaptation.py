"""Block-size adaptation in ``unmask rl``: every objective trains at the new block, the run and
the saved model record it, and conflicting settings are refused. (The replay at a larger block
is checked exactly in tests/test_objectives_replay.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unmask.config import load_config
from unmask.models import DiffusionLM
from unmask.objectives import OBJECTIVES
from unmask.sampling import SamplerConfig
from unmask.train.rl import RLTrainer
from unmask.train.rl_config import RLConfig

ROOT = Path(__file__).parents[1]


def _config(tmp_path, **kw):
    base = {"model": "nano-block", "output_dir": str(tmp_path / "run"), "num_prompts": 2,
            "num_generations": 2, "max_steps": 1, "progress": False, "plots": False,
            "sampler": SamplerConfig(gen_length=8, temperature=1.0)}  # fmt: skip
    return RLConfig(**{**base, **kw})


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_objective_trains_and_saves_the_new_block(tmp_path, objective):
    trainer = RLTrainer(_config(tmp_path, objective=objective, block_size=8))
    final = trainer.train()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert metrics[-1]["block_size"] == 8
    assert metrics[-1]["num_views"] > 0  # it trained on rollouts sampled at block 8
    saved = json.loads((final / "config.json").read_text())["diffusion"]
    assert (saved["layout"], saved["block_size"]) == ("block", 8)
    assert DiffusionLM.from_pretrained(final).block_size == 8


def test_sampler_block_length_adapts_a_block_model_and_must_agree(tmp_path):
    sampler = SamplerConfig(gen_length=8, block_length=8, temperature=1.0)
    trainer = RLTrainer(_config(tmp_path, sampler=sampler))
    # settled once at start: the model and the rollout sampler's config say the same block
    assert trainer.core.block_size == trainer.sampler.config.block_length == 8
    final = trainer.train()
    assert DiffusionLM.from_pretrained(final).block_size == 8  # what the rollouts were
    with pytest.raises(ValueError, match=r"sampler.block_length \(8\) and block_size \(4\) differ"):
        RLTrainer(_config(tmp_path, sampler=sampler, block_size=4))
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        _config(tmp_path, block_size=0)


def test_full_models_keep_their_decoding_block_unless_asked(tmp_path):
    sampler = SamplerConfig(gen_length=8, block_length=4, temperature=1.0)
    trainer = RLTrainer(_config(tmp_path, model="nano-full", sampler=sampler))
    assert (trainer.core.block_size, trainer.sampler.config.block_length) == (32, 4)
    final = trainer.train()
    assert DiffusionLM.from_pretrained(final).block_size == 32  # a decoding choice only


def test_recipe_loads():
    config = load_config(RLConfig, ROOT / "configs" / "rl_block_adapt_sudoku_tiny.yaml")
    assert config.block_size == 8 and config.sampler.gen_length % 8 == 0
