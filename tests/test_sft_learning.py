"""A few hundred steps of block SFT on 4x4 Sudoku clearly lower the loss and raise held-out cell
accuracy (greedy sampling with unmask's Sampler), starting from an untrained nano model."""

from __future__ import annotations

import pytest

from unmask.metrics import read_metrics
from unmask.models import DiffusionLM, from_preset
from unmask.sampling import Sampler, SamplerConfig
from unmask.tasks import get_task
from unmask.tasks.sudoku import sudoku_cells
from unmask.train.sft import SFTConfig, SFTData, SFTTrainer

HELD_OUT = 32


def _cell_accuracy(model: DiffusionLM, rows) -> float:
    sampler = Sampler(SamplerConfig(gen_length=20, temperature=0.0))
    rollout = sampler.generate(model.eval(), rows["prompt"])
    completions = rollout.completion_texts(model.tokenizer)
    cells = sudoku_cells(rows["prompt"], completions, rows["puzzle"], rows["solution"])
    return sum(cells) / len(cells)


@pytest.mark.slow
def test_sft_learns_sudoku(tmp_path):
    task = get_task("sudoku", blanks=6, num_train=2000, num_test=HELD_OUT)
    held_out = task.dataset("test")
    before = _cell_accuracy(from_preset("nano-block"), held_out)
    config = SFTConfig(
        model="nano-block",
        output_dir=str(tmp_path / "sft"),
        data=SFTData(task="sudoku", options={"blanks": 6, "num_train": 2000}),
        max_steps=250,
        batch_size=64,
        lr=3e-3,
        warmup_steps=20,
        log_every=25,
        cpu=True,
        progress=False,
    )
    trainer = SFTTrainer(config, task=task)
    trainer.train()
    after = _cell_accuracy(trainer.core, held_out)
    losses = [r["loss"] for r in read_metrics(tmp_path / "sft")]
    assert losses[-1] < 0.5 * losses[0], losses
    # untrained: 0 (it writes no digits); random digits would score 0.25
    assert after > max(before, 0.25) + 0.05, (before, after)
