"""The SFT trainer: resume continues (and logs) exactly, bad checkpoints are refused, a resume
with no checkpoint yet starts over, non-finite updates are skipped, the CLI runs."""

from __future__ import annotations

import random

import pytest
import torch

from tiny_rl import assert_same_weights, untimed
from unmask.cli import main
from unmask.metrics import read_metrics
from unmask.models import DiffusionLM
from unmask.train.checkpoint import CheckpointError, checkpoint_dirs
from unmask.train.sft import SFTConfig, SFTTrainer, encode_pairs


def _pairs():
    from unmask.models import build_char_tokenizer

    rng = random.Random(0)
    prompts = [
        "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 9))) for _ in range(40)
    ]
    targets = [p[::-1][: rng.randint(1, 7)] for p in prompts]
    return encode_pairs(build_char_tokenizer(), prompts, targets)


def _config(tmp_path, name, model, **kw):
    base = {
        "model": model,
        "output_dir": str(tmp_path / name),
        "max_steps": 6,
        "batch_size": 4,
        "grad_accum": 2,
        "lr": 3e-3,
        "warmup_steps": 2,
        "save_every": 3,
        "log_every": 1,
        "cpu": True,
        "progress": False,
    }
    return SFTConfig(**{**base, **kw})


class _Stop(Exception):
    pass


def _train_until_checkpoint(config, pairs, stop_at):
    trainer = SFTTrainer(config, pairs=pairs)
    save = trainer.save

    def save_then_stop(step):
        path = save(step)
        if step == stop_at:
            raise _Stop
        return path

    trainer.save = save_then_stop
    with pytest.raises(_Stop):
        trainer.train()


@pytest.mark.parametrize("model", ["nano-block", "nano-full"])
def test_resume_continues_exactly(tmp_path, model):
    pairs = _pairs()
    # logged every 2 steps, saved at step 3: the checkpoint holds half a logging window
    straight = SFTTrainer(_config(tmp_path, "straight", model, log_every=2), pairs=pairs).train()
    _train_until_checkpoint(_config(tmp_path, "resumed", model, log_every=2), pairs, stop_at=3)
    config = _config(tmp_path, "resumed", model, log_every=2, resume="latest")
    resumed = SFTTrainer(config, pairs=pairs).train()
    a, b = DiffusionLM.from_pretrained(straight), DiffusionLM.from_pretrained(resumed)
    assert_same_weights(a, b)
    # the metrics read as one run: the resumed run's lines replace nothing and repeat nothing,
    # and its first line (step 4) averages steps 3 and 4 as the uninterrupted run's does:
    # every logged value is exactly equal, not merely close
    la, lb = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in lb] == [2, 4, 6]
    assert untimed(la) == untimed(lb)
    assert lb[-1]["elapsed_s"] > lb[0]["elapsed_s"]  # training time counts across the resume


def test_corrupt_checkpoint_is_refused_and_the_previous_one_kept(tmp_path):
    pairs = _pairs()
    SFTTrainer(_config(tmp_path, "run", "nano-block"), pairs=pairs).train()
    first, last = checkpoint_dirs(tmp_path / "run")
    (last / "model.safetensors").unlink()
    config = _config(tmp_path, "run", "nano-block", resume="latest", max_steps=9)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing") as err:
        SFTTrainer(config, pairs=pairs).train()
    assert str(last) in str(err.value)
    assert first.is_dir() and (first / "model.safetensors").is_file()
    # the previous checkpoint still resumes
    config = _config(tmp_path, "run", "nano-block", resume=str(first), max_steps=4, save_every=0)
    assert SFTTrainer(config, pairs=pairs).train().is_dir()


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    pairs = _pairs()
    SFTTrainer(_config(tmp_path, "run", "nano-block", max_steps=3), pairs=pairs).train()
    with pytest.raises(ValueError, match="already has checkpoints"):
        SFTTrainer(_config(tmp_path, "run", "nano-block", max_steps=3), pairs=pairs).train()


def test_cli_runs_a_task_and_reports_errors(tmp_path, capsys):
    config = tmp_path / "sft.yaml"
    config.write_text(
        "model: nano-block\n"
        f"output_dir: {tmp_path / 'cli'}\n"
        "data: {task: sudoku, options: {blanks: 4, num_train: 32}}\n"
        "max_steps: 2\nbatch_size: 4\ncpu: true\nprogress: false\n"
        "eval: {every: 2, limit: 4, batch_size: 4, sampler: {gen_length: 20}}\n"
    )
    assert main(["sft", str(config), "lr=0.001"]) == 0
    assert "final model:" in capsys.readouterr().out
    records = read_metrics(tmp_path / "cli")
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(records[1])
    assert "eval/accuracy" in records[0] and "eval/sudoku_cells" in records[-1]
    # no checkpoint there: --resume starts over (a requeued job may not have saved yet)
    assert main(["sft", str(config), "--resume", "max_steps=3"]) == 0
    assert "no checkpoint" in capsys.readouterr().err
    # one run's lines, the first attempt's dropped: evals at 0, 2, 3; a train line at 3
    assert [r["step"] for r in read_metrics(tmp_path / "cli")] == [0, 2, 3, 3]
    assert main(["sft", str(config), "objective=random_mask"]) == 2
    assert "does not fit a 'block' model" in capsys.readouterr().err


def test_block_size_adaptation_trains_and_saves_the_new_block(tmp_path, monkeypatch):
    import unmask.train.sft as sft
    from unmask.sampling import Sampler, SamplerConfig

    seen = []
    real = sft.collate

    def spy(pairs, pad_id, block_size, *args, **kw):
        seen.append(block_size)
        return real(pairs, pad_id, block_size, *args, **kw)

    monkeypatch.setattr(sft, "collate", spy)
    config = _config(tmp_path, "adapt", "nano-block", block_size=8, max_steps=2, save_every=0)
    final = SFTTrainer(config, pairs=_pairs()).train()
    assert set(seen) == {8}  # every training row is laid out in blocks of 8
    assert [r["block_size"] for r in read_metrics(tmp_path / "adapt")] == [8, 8]
    model = DiffusionLM.from_pretrained(final)
    assert (model.layout, model.block_size) == ("block", 8)  # the new native block
    rollout = Sampler(SamplerConfig(gen_length=8)).generate(model, ["12"])
    assert rollout.block_length == 8
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        _config(tmp_path, "bad", "nano-block", block_size=0)


def test_resume_without_a_checkpoint_starts_from_step_0(tmp_path, caplog, capsys):
    run = tmp_path / "requeued"
    run.mkdir()
    # what an attempt killed before its first checkpoint leaves behind
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n')
    config = _config(tmp_path, "requeued", "nano-block", resume="latest", max_steps=2)
    assert SFTTrainer(config, pairs=_pairs()).train().is_dir()
    notice = "no checkpoint in"
    assert notice in caplog.text and notice in capsys.readouterr().err  # logged and printed
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2] and records[0]["loss"] != 9.0
    missing = _config(tmp_path, "other", "nano-block", resume=str(run / "nope"))
    with pytest.raises(CheckpointError, match="does not exist"):  # a named folder must exist
        SFTTrainer(missing, pairs=_pairs()).train()


def test_a_non_finite_update_is_skipped_and_training_continues(tmp_path, monkeypatch):
    import unmask.train.sft as sft

    real, calls = sft.sft_loss, []

    def nan_at_step_2(*args, **kwargs):  # grad_accum 2: calls 3 and 4 are step 2's
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) in (3, 4):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(sft, "sft_loss", nan_at_step_2)
    trainer = SFTTrainer(_config(tmp_path, "nan", "nano-block", max_steps=3), pairs=_pairs())
    weights, step = [], trainer._step

    def recorded(n):
        out = step(n)
        weights.append({k: v.clone() for k, v in trainer.core.state_dict().items()})
        return out

    trainer._step = recorded
    trainer.train()
    after_1, after_2, after_3 = weights
    for name, value in after_2.items():
        assert torch.equal(value, after_1[name]), name  # step 2 changed nothing
        assert torch.isfinite(value).all(), name
    assert any(not torch.equal(v, after_2[k]) for k, v in after_3.items())  # step 3 trained
    records = read_metrics(tmp_path / "nan")
    assert [r.get("skipped_updates") for r in records] == [None, 1, None]  # RL's metric name
    assert records[1]["loss"] is None  # the NaN, logged as null


def test_repeated_non_finite_updates_stop_the_run(tmp_path, monkeypatch):
    import unmask.train.sft as sft

    real = sft.sft_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(sft, "sft_loss", poisoned)
    config = _config(tmp_path, "diverged", "nano-block", max_bad_steps=2, log_every=5)
    with pytest.raises(RuntimeError, match="2 updates in a row"):
        SFTTrainer(config, pairs=_pairs()).train()
    last = read_metrics(tmp_path / "diverged")[-1]  # logged before stopping, off-schedule
    assert (last["step"], last["skipped_updates"]) == (2, 2)


def test_time_cap_stops_early_and_saves_the_final_model(tmp_path, capsys):
    # the run skeleton SFT shares with RL: its wall-clock cap stops, logs and saves
    config = _config(tmp_path, "capped", "nano-block", max_time_s=0.0, save_every=0)
    final = SFTTrainer(config, pairs=_pairs()).train()
    assert (final / "model.safetensors").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "capped")] == [1]
    assert "SFT stopped at 1/6 steps: time cap" in capsys.readouterr().err


def test_resume_on_other_data_is_refused(tmp_path):
    _train_until_checkpoint(_config(tmp_path, "run", "nano-block"), _pairs(), stop_at=3)
    config = _config(tmp_path, "run", "nano-block", resume="latest")
    with pytest.raises(ValueError, match="resume with the same data"):
        SFTTrainer(config, pairs=_pairs()[:30]).train()
