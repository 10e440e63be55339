"""The main job, shortened: every stage runs, writes its files, resumes and reuses the cache."""

from __future__ import annotations

import json
import shutil

import pytest

from repo_root import REPO
from unmask.cli import main
from unmask.config import ConfigError
from unmask.quickstart import OPTIONS, QuickstartConfig, compare, plan, run_quickstart

TINY = {
    "minutes": None,
    "eval_limit": 8,
    "eval_batch_size": 8,
    "progress": False,
    "sft": {"max_steps": 4, "batch_size": 8, "warmup_steps": 0},
    "rl": {"max_steps": 2, "num_prompts": 2, "num_generations": 2, "save_every": 1},
}


def _config(tmp_path, name="run", **kw):
    return QuickstartConfig(
        output_dir=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), **{**TINY, **kw}
    )


@pytest.mark.slow
def test_shortened_quickstart_writes_the_run_folder_and_resumes(tmp_path, capsys):
    results = run_quickstart(_config(tmp_path))
    out = tmp_path / "run"
    for path in ("sft/final/model.safetensors", "rl/final/model.safetensors",
                 "eval_sft/sampled/summary.json", "eval_sft/greedy/summary.json",
                 "eval_rl/greedy/generations.jsonl", "eval_rl/sampled/trace.html",
                 "results.json", "results.png", "rl/plots/overview.png"):  # fmt: skip
        assert (out / path).is_file(), path
    saved = json.loads((out / "results.json").read_text())
    metrics = [r["metric"] for r in saved["rows"]]
    assert metrics[0] == "accuracy (sampled)" and "accuracy (greedy)" in metrics
    assert "sudoku_cells (greedy)" in metrics and "sudoku_solved (greedy)" not in metrics
    assert metrics[-1] == "mean NFE (greedy)" and saved["rl_steps"] == 2
    assert results["num_samples"] == 8
    assert "SFT + RL" in capsys.readouterr().out

    # Interrupted during RL: the model and the evaluation after it are gone, a checkpoint is
    # left. Running again resumes RL from it and reuses the finished SFT and first evaluation.
    shutil.rmtree(out / "rl" / "final")
    shutil.rmtree(out / "eval_rl")
    (out / "rl" / "metrics.jsonl").write_text(
        "\n".join((out / "rl" / "metrics.jsonl").read_text().splitlines()[:1]) + "\n"
    )
    shutil.rmtree(sorted((out / "rl" / "checkpoints").iterdir())[-1])  # keep step 1 only
    sft_mtime = (out / "sft" / "final" / "model.safetensors").stat().st_mtime
    run_quickstart(_config(tmp_path))
    lines = (out / "rl" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [1, 2]  # step 2 was trained again after resuming from step 1
    assert (out / "sft" / "final" / "model.safetensors").stat().st_mtime == sft_mtime
    assert (out / "eval_rl" / "greedy" / "summary.json").is_file()

    # The same folder with another objective would silently reuse the SFT stages: refused.
    with pytest.raises(ConfigError, match="objective"):
        run_quickstart(_config(tmp_path, objective="agrpo"))


@pytest.mark.slow
def test_a_second_run_reuses_the_cached_sft_model_and_keeps_the_budget(tmp_path):
    run_quickstart(_config(tmp_path, "first", rl={**TINY["rl"], "max_steps": 1}))
    # A budget already spent: RL still takes one step, then stops early and saves its model.
    second = _config(tmp_path, "second", objective="agrpo", minutes=0.001,
                     rl={**TINY["rl"], "max_steps": 5})  # fmt: skip
    results = run_quickstart(second)
    assert (tmp_path / "first" / "sft" / "metrics.jsonl").exists()
    assert not (tmp_path / "second" / "sft" / "metrics.jsonl").exists()  # not trained again
    assert (tmp_path / "second" / "rl" / "final" / "model.safetensors").is_file()
    assert results["rl_steps"] == 1


@pytest.mark.slow
def test_a_time_cap_that_cuts_rl_is_reported(tmp_path, capsys):
    results = run_quickstart(_config(tmp_path, minutes=0.001, rl={**TINY["rl"], "max_steps": 5}))
    said = "RL stopped at 1/5 steps: time cap"
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["stopped"] == saved["stopped"] == said
    assert (saved["rl_steps"], saved["rl_max_steps"]) == (1, 5)
    out = capsys.readouterr().out
    assert said in out  # the table's caption and the line after it
    assert "results: " + str(tmp_path / "run" / "results.json") in out.replace("\n", "")


def test_a_full_run_says_its_steps_and_no_cap(tmp_path):
    results = run_quickstart(_config(tmp_path, rl={**TINY["rl"], "max_steps": 1}))
    assert results["stopped"] is None and results["rl_steps"] == results["rl_max_steps"] == 1


def test_every_option_is_documented():
    from dataclasses import fields

    names = [f.name for f in fields(QuickstartConfig)]
    assert list(OPTIONS) == names
    docs = (REPO / "docs" / "quickstart.md").read_text()
    assert all(f"`{name}`" in docs for name in names)


def test_recipe_overrides_are_checked_and_named(tmp_path):
    assert plan(_config(tmp_path, rl={"lr": 1e-4})).rl.lr == 1e-4
    with pytest.raises(ConfigError, match=r"rl\.learning_rate"):
        plan(_config(tmp_path, rl={"learning_rate": 1e-4}))
    with pytest.raises(ValueError, match="task must be one of"):
        _config(tmp_path, task="chess")


def test_cli_options_reach_the_config(tmp_path, capsys):
    code = main(["quickstart", "--task", "sudoku", "--objective", "ppo", "--output-dir",
                 str(tmp_path / "x"), "minutes=null"])  # fmt: skip
    assert code == 2 and "objective must be one of" in capsys.readouterr().err


def test_compare_flags_non_overlapping_intervals():
    def summary(accuracy, ci, cells):
        return {"accuracy": accuracy, "accuracy_ci95": ci, "mean_nfe": 19.0, "num_samples": 3,
                "samples": {"solved": [0.0, 1.0, 0.0], "cells": cells}}  # fmt: skip

    before = {"sampled": summary(0.2, [0.15, 0.25], [0.5, 0.7, 0.6])}
    after = {"sampled": summary(0.5, [0.44, 0.56], [0.9, 0.8, 1.0])}
    result = compare(before, after, accuracy_reward="solved")
    assert result["significant"] and result["accuracy_gain"] == pytest.approx(0.3)
    assert [r["metric"] for r in result["rows"]] == [
        "accuracy (sampled)", "cells (sampled)", "mean NFE (sampled)"]  # fmt: skip
    row = result["rows"][1]
    assert row["change"] == pytest.approx(0.3)
    assert row["before_ci95"][0] < 0.6 < row["before_ci95"][1]
    close = {"sampled": summary(0.22, [0.17, 0.27], [0.5, 0.7, 0.6])}
    assert not compare(before, close)["significant"]
