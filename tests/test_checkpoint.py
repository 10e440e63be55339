"""Checkpoints: exact round trip, pruning, atomic saves, refusal of partial or corrupt folders
(SHA-256 digests catch same-size damage, on resume and when a model folder is loaded); the
metrics writer."""

from __future__ import annotations

import importlib.util
import json
import random

import numpy as np
import pytest
import torch

from unmask.integrity import file_sha256, verify_model_folder
from unmask.metrics import MetricsWriter, read_metrics
from unmask.models import DiffusionLM, from_preset
from unmask.models.saving import save_model
from unmask.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


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
        (second / "optimizer" / ".metadata").unlink()
        message = "optimizer/.metadata is missing"
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


def _flip_byte(path):
    """Same-size damage: invert the middle byte (inside the tensors of a weights file)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_digests_are_those_of_the_written_files(tmp_path):
    model, optimizer, scheduler = _setup()
    _train_step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    manifest = json.loads((path / "checkpoint.json").read_text())
    # hashed while written (scheduler, rng, trainer state) or right after (the rest, the
    # optimizer's DCP files among them)
    assert set(manifest["sha256"]) == set(manifest["files"]) >= {
        "model.safetensors", "config.json", "optimizer/.metadata", "optimizer/__0_0.distcp",
        "scheduler.pt", "rng_state.pt", "trainer_state.json",
    }  # fmt: skip
    for name, digest in manifest["sha256"].items():
        assert file_sha256(path / name) == digest, name


@pytest.mark.parametrize("damage", ["flip_weights", "zero_optimizer"])
def test_same_size_corruption_is_refused_on_resume(tmp_path, damage):
    model, optimizer, scheduler = _setup()
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    if damage == "flip_weights":
        name = "model.safetensors"
        _flip_byte(path / name)
    else:
        name = "optimizer/__0_0.distcp"
        data = bytearray((path / name).read_bytes())
        data[-600:-100] = bytes(500)  # a zeroed block, as a bad disk sector leaves it
        (path / name).write_bytes(bytes(data))
    before = model.model.lm_head.weight.clone()
    with pytest.raises(CheckpointError, match="SHA-256 mismatch") as err:
        load_checkpoint(path, model, optimizer, scheduler)
    assert f"{path / name}: SHA-256 mismatch" in str(err.value)
    assert torch.equal(model.model.lm_head.weight, before)  # nothing was loaded


def test_a_corrupted_model_folder_is_refused_when_loaded(tmp_path):
    model, optimizer, scheduler = _setup()
    checkpoint = save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    final = save_model(model, tmp_path / "final")  # what the trainers write at the end
    assert (final / "checkpoint.json").is_file()
    for folder in (checkpoint, final):
        verify_model_folder(folder)  # intact: accepted
        _flip_byte(folder / "model.safetensors")
        with pytest.raises(CheckpointError, match=r"model\.safetensors: SHA-256 mismatch") as err:
            verify_model_folder(folder)
        assert "delete" in str(err.value)  # loading a model: the manifest is optional
    bare = tmp_path / "bare"
    model.save_pretrained(bare)  # no manifest (a hub download, another tool): loads as it is
    verify_model_folder(bare)


def test_old_manifests_and_disabled_checksums_check_sizes_only(tmp_path, monkeypatch):
    model, optimizer, scheduler = _setup()
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    manifest_path = path / "checkpoint.json"
    manifest = json.loads(manifest_path.read_text())
    _flip_byte(path / "model.safetensors")  # a weight's byte: still loads, changed
    monkeypatch.setenv("UNMASK_VERIFY_CHECKSUMS", "0")
    assert load_checkpoint(path, model, optimizer, scheduler)["step"] == 1
    monkeypatch.delenv("UNMASK_VERIFY_CHECKSUMS")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path, model, optimizer, scheduler)
    del manifest["sha256"]  # a manifest written before digests existed
    manifest_path.write_text(json.dumps(manifest))
    assert load_checkpoint(path, model, optimizer, scheduler)["step"] == 1
    verify_model_folder(path)
    (path / "optimizer" / "__0_0.distcp").write_bytes(b"short")
    with pytest.raises(CheckpointError, match=r"optimizer/__0_0\.distcp has 5 bytes"):
        verify_model_folder(path)


def test_a_resume_that_found_no_checkpoint_starts_a_new_metrics_file(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in (0, 1, 2):  # an attempt killed before its first checkpoint
        writer.log(step, {"loss": 1.0})
    MetricsWriter(tmp_path, resume_step=0).log(0, {"eval/accuracy": 0.5})
    assert read_metrics(tmp_path) == [{"step": 0, "eval/accuracy": 0.5}]
