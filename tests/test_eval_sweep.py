"""``unmask eval`` sweeps: one row per decoding setting, with the NFE each setting implies."""

from __future__ import annotations

import csv
import json

import pytest

from unmask.cli import main
from unmask.eval.sweep import EvalSweep
from unmask.sampling import SamplerConfig


def test_settings_are_the_union_of_static_and_dynamic_schedules():
    base = SamplerConfig(remasking="threshold", threshold=0.9, steps_per_block=3)
    settings = EvalSweep(steps_per_block=[1, 4], threshold=[0.5]).settings(base)
    assert [name for name, _ in settings] == ["steps-1", "steps-4", "threshold-0.5"]
    assert [(c.remasking, c.steps_per_block) for _, c in settings[:2]] == [
        ("low_confidence", 1),
        ("low_confidence", 4),
    ]
    assert (settings[2][1].remasking, settings[2][1].threshold) == ("threshold", 0.5)


def test_sweep_writes_one_row_per_setting(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["eval", "--model", "nano-block", "task=sudoku", "limit=4", "batch_size=4",
               f"output_dir={out}", "sampler.gen_length=8", "sampler.stop_at_eos=false",
               "sweep.steps_per_block=[1,2,4]", "sweep.threshold=[0.0,1.0]"])  # fmt: skip
    assert rc == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert json.loads(capsys.readouterr().out) == rows
    assert [r["setting"] for r in rows] == [
        "steps-1", "steps-2", "steps-4", "threshold-0", "threshold-1"
    ]  # fmt: skip
    with (out / "sweep.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["setting"] for r in table] == [r["setting"] for r in rows]
    assert (out / "sweep.png").stat().st_size > 0 and (out / "sweep_table.png").exists()
    nfe = {r["setting"]: r["mean_nfe"] for r in rows}
    # 8 tokens in 4-token blocks aligned to position 0: a prompt tail of t tokens makes the
    # completion span 2 blocks (t = 0) or 3; one step per block, or one token per step.
    prompts = [json.loads(line) for line in (out / "steps-1" / "generations.jsonl").open()]
    from unmask.models import from_preset

    tokenizer = from_preset("nano-block").tokenizer
    tails = [len(tokenizer(p["prompt"])["input_ids"]) % 4 for p in prompts]
    blocks = sum(2 if t == 0 else 3 for t in tails) / len(tails)
    assert nfe["steps-1"] == blocks == nfe["threshold-0"]  # threshold 0 takes a whole block
    assert nfe["steps-4"] == 8 == nfe["threshold-1"]  # threshold 1 takes one token a step
    assert blocks < nfe["steps-2"] < 8
    for r in rows:
        summary = json.loads((out / r["setting"] / "summary.json").read_text())
        assert r["accuracy"] == summary["accuracy"] and r["mean_nfe"] == summary["mean_nfe"]
        assert r["nfe_per_token"] == pytest.approx(r["mean_nfe"] / 8)


def test_sweep_errors_name_the_field(capsys):
    assert main(["eval", "--model", "nano-block", "sweep.steps_per_block=[0]",
                 "output_dir=/tmp/x"]) == 2  # fmt: skip
    assert "sweep.steps_per_block[0] must be >= 1" in capsys.readouterr().err
    assert main(["eval", "--model", "nano-block", "sweep.threshold=[0.5]"]) == 2
    assert "sweep needs an output_dir" in capsys.readouterr().err


def test_sweep_recipe_loads():
    from pathlib import Path

    from unmask.config import load_config
    from unmask.eval import EvalConfig

    path = Path(__file__).parents[1] / "configs" / "eval_sweep_sudoku_tiny.yaml"
    config = load_config(EvalConfig, path)
    assert len(config.sweep.settings(config.sampler)) == 6
