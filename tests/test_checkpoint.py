"""Checkpoints: exact round trip, pruning, atomic saves, refusal of partial or corrupt folders;
the metrics writer."""

from __future__ import annotations

import importlib.util
import json
import random

import numpy as np
import pytest
import torch

from unmask.models import DiffusionLM, from_preset
from unmask.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from unmask.train.metrics import MetricsWriter, read_metrics


def _setup(seed: int = 0):
    model = from_preset("nano-block", seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def _train_step(model, optimizer, scheduler):
    ids = torch.randint(5, 90, (2, 8))
    pos = torch.arange(8).expand(2, -1)
    loss = model(ids, pos, torch.zeros(2, 1, 8, 8)).logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_round_trip_restores_everything(tmp_path):
    model, optimizer, scheduler = _setup()
    _train_step(model, optimizer, scheduler)
    generator = torch.Generator().manual_seed(7)
    path = save_checkpoint(
        tmp_path, 3, model, optimizer, scheduler, {"data": {"epoch": 1, "index": 5}},
        rng_states=[capture_rng_state({"noise": generator})],
    )  # fmt: skip
    state = [random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=generator)]

    other, other_opt, other_sched = _setup(seed=9)
    random.random(), np.random.rand(), torch.rand(3)
    generator.manual_seed(123)
    got = load_checkpoint(path, other, other_opt, other_sched, generators={"noise": generator})
    assert got == {"step": 3, "data": {"epoch": 1, "index": 5}}
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert other_sched.state_dict() == scheduler.state_dict()
    a_state, b_state = optimizer.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(a_state[k]["exp_avg"], b_state[k]["exp_avg"]) for k in a_state)
    # random streams continue where they were at the save
    assert [random.random(), np.random.rand()] == state[:2]
    assert torch.equal(torch.rand(1), state[2])
    assert torch.equal(torch.rand(1, generator=generator), state[3])
    # the checkpoint is an ordinary model folder
    loaded = DiffusionLM.from_pretrained(path)
    assert torch.equal(loaded.model.lm_head.weight, model.model.lm_head.weight)


def test_keeps_the_last_k_and_finds_the_latest(tmp_path):
    model, optimizer, scheduler = _setup()
    assert latest_checkpoint(tmp_path) is None
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000020", "step-00000030"]
    assert latest_checkpoint(tmp_path).name == "step-00000030"


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = _setup()
    first = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, keep_last=1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(optimizer, "state_dict", crash)
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(tmp_path, 2, model, optimizer, scheduler, keep_last=1)
    assert latest_checkpoint(tmp_path) == first
    load_checkpoint(first, model, optimizer, scheduler)  # still complete
    second = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, keep_last=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [second.name]


@pytest.mark.parametrize("damage", ["delete", "truncate", "no_manifest"])
def test_partial_or_corrupt_checkpoint_is_refused(tmp_path, damage):
    model, optimizer, scheduler = _setup()
    first = save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    second = save_checkpoint(tmp_path, 2, model, optimizer, scheduler)
    if damage == "delete":
        (second / "optimizer.pt").unlink()
        message = "optimizer.pt is missing"
    elif damage == "truncate":
        weights = second / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        message = "model.safetensors has 100 bytes"
    else:
        (second / "checkpoint.json").unlink()
        message = "checkpoint.json is missing"
    before = model.model.lm_head.weight.clone()
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(latest_checkpoint(tmp_path), model, optimizer, scheduler)
    assert str(second) in str(err.value)
    assert torch.equal(model.model.lm_head.weight, before)  # nothing was loaded
    assert first.is_dir()
    load_checkpoint(first, model, optimizer, scheduler)


def test_weights_of_another_model_are_refused(tmp_path):
    model, optimizer, scheduler = _setup()
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    other = from_preset("micro-block")
    with pytest.raises(CheckpointError):
        load_checkpoint(path, other)


def test_extra_state_cannot_shadow_the_step(tmp_path):
    model, optimizer, _ = _setup()
    with pytest.raises(ValueError, match="'step'"):
        save_checkpoint(tmp_path, 1, model, optimizer, extra_state={"step": 5})


def test_metrics_jsonl_and_resume_truncation(tmp_path, caplog):
    writer = MetricsWriter(tmp_path, report_to=["tensorboard"])
    for step in (1, 2, 3):
        writer.log(step, {"loss": 1.0 / step, "nan": float("nan")})
    writer.close()
    if importlib.util.find_spec("tensorboard") is None:
        assert "tensorboard is not installed" in caplog.text
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["nan"] is None
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # a line cut short by a crash
    MetricsWriter(tmp_path, resume_step=2).log(3, {"loss": 0.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 0.5),
        (3, 0.5),
    ]
    with pytest.raises(ValueError, match="unknown reporter"):
        MetricsWriter(tmp_path, report_to=["mlflow"])
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
