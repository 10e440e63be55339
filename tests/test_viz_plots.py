"""Plots of a real short RL run, and the before/after table, are real non-empty images."""

from __future__ import annotations

import json

import pytest
from matplotlib.image import imread

from unmask.sampling import SamplerConfig
from unmask.train.rl import RLTrainer
from unmask.train.rl_config import RLConfig, RLEval
from unmask.viz.plots import load_series, plot_metrics, plot_table


def _image(path):
    """The PNG's pixels; fails unless it is a real image with more than one colour."""
    pixels = imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100, pixels.shape
    assert pixels.std() > 0.01, f"{path} is blank"
    return pixels


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("viz") / "rl"
    sampler = SamplerConfig(gen_length=8, temperature=1.0)
    cfg = RLConfig(
        model="nano-block",
        output_dir=str(out),
        num_prompts=2,
        num_generations=4,
        max_steps=3,
        beta=0.05,
        sampler=sampler,
        eval=RLEval(every=2, limit=4, sampler=SamplerConfig(gen_length=8)),
        progress=False,
    )
    RLTrainer(cfg).train()
    return out


def test_plots_of_a_real_run(rl_run):
    written = plot_metrics(rl_run)
    names = [p.name for p in written]
    for name in ("reward.png", "accuracy.png", "kl.png", "clip_ratio.png", "nfe_per_token.png"):
        assert name in names, names
    assert names[-1] == "overview.png"
    assert all(p.parent == rl_run / "plots" for p in written)
    for path in written:
        _image(path)


def test_series_follow_the_metrics_file(rl_run):
    series = load_series(rl_run)
    assert series["reward"][0] == [1, 2, 3]
    assert series["eval/accuracy"][0] == [0, 2, 3]  # before training, every 2, and the last
    tps = series["tokens_per_step"][1]
    assert series["nfe_per_token"][1] == pytest.approx([1 / t for t in tps])


def test_nulls_and_a_line_cut_short_are_skipped(tmp_path):
    lines = [
        {"step": 1, "reward": 0.1, "reward_std": 0.05, "kl": None},
        {"step": 2, "reward": 0.3, "reward_std": 0.1, "kl": 0.02},
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "rew'
    (tmp_path / "metrics.jsonl").write_text(text)
    series = load_series(tmp_path)
    assert series["kl"] == ([2], [0.02])
    assert series["reward"] == ([1, 2], [0.1, 0.3])
    written = plot_metrics(tmp_path, tmp_path / "out")
    assert [p.name for p in written] == ["reward.png", "kl.png", "overview.png"]


def test_bad_input_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        plot_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1\n{"step": 2, "reward": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1"):
        plot_metrics(tmp_path)
    with pytest.raises(ValueError, match="rows is empty"):
        plot_table([], tmp_path / "t.png")


def test_table_png(tmp_path):
    rows = [
        {"model": "sft", "accuracy": 0.25, "accuracy_ci95": [0.18, 0.33], "n": 128},
        {"model": "sft + tracerl", "accuracy": 0.5, "accuracy_ci95": (0.41, 0.59), "n": 128},
    ]
    path = plot_table(rows, tmp_path / "sub" / "before_after.png", title="Sudoku 4x4")
    pixels = _image(path)
    assert pixels.shape[1] > pixels.shape[0]  # a wide, short table
