"""FSDP2 on 2 CPU processes (gloo), through ``accelerate launch`` with the shipped
``configs/accelerate/fsdp.yaml`` (accelerate itself ignores FSDP on CPU; the trainers shard
the model themselves, as on GPUs) against the same runs under ``ddp.yaml``: SFT, TraceRL,
AGRPO and TraceRL with the value model (sharded as the policy) end with the same weights,
rollouts from the gathered inference copy equal rollouts sampled through the sharded model,
and FSDP2 checkpoints (the value model's among them) resume on one process.

The file is also the worker: ``accelerate launch tests/test_fsdp.py OUT_DIR``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from two_processes import launch_ok

RUNS = ("sft", "tracerl", "agrpo", "value")
# The "value" run: TraceRL with the value model, trained at even steps (forwards alone at odd);
# rank 1's groups are all dropped, so its value passes are all spare ones (see ``variety``).
VALUE = {
    "value_model": {"enabled": True, "lr": 1e-3, "train_every": 2},
    "drop_zero_std_groups": True,
}
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # fp32, sums over shards in another order


def _rl_config(output_dir: Path, objective: str, **changes):
    from unmask.config import from_dict
    from unmask.train.rl_config import RLConfig

    base = {
        "model": "nano-block",
        "output_dir": str(output_dir),
        "objective": objective,
        "cpu": True,
        "max_steps": 2,
        "num_prompts": 2,  # over both ranks: one group each
        "num_generations": 4,
        "micro_batch_size": 8,
        "lr": 3e-3,
        "beta": 0.04 if objective == "tracerl" else 0.0,  # a sharded KL reference too
        "sampler": {"gen_length": 8, "temperature": 1.0},
        "data": {"task": "sudoku", "options": {"num_train": 32, "blanks": 4}},
        "progress": False,
        "plots": False,
    }
    return from_dict(RLConfig, {**base, **changes})


def _sft_config(output_dir: Path, **changes):
    from unmask.config import from_dict
    from unmask.train.sft import SFTConfig

    base = {
        "model": "nano-block",
        "output_dir": str(output_dir),
        "cpu": True,
        "max_steps": 2,
        "batch_size": 4,
        "grad_accum": 2,
        "data": {"task": "sudoku", "options": {"num_train": 32, "blanks": 4}},
        "progress": False,
        "plots": False,
    }
    return from_dict(SFTConfig, {**base, **changes})


def variety(prompts, completions, **_):
    """A reward an untrained policy varies on (the fraction of distinct characters), so the
    value model has returns to learn (sudoku's own is 0 for every completion here); constant
    on rank 1, whose groups ``drop_zero_std_groups`` then drops: it keeps no rollout, and its
    sharded value forwards (collectives) are all spare ones."""
    if os.environ.get("RANK", "0") == "1":
        return [0.0] * len(completions)
    return [len(set(c)) / max(len(c), 1) for c in completions]


def _task():
    from unmask.tasks.registry import get_task

    solved = get_task("sudoku").reward_funcs[1]  # the accuracy reward stays, weight 0
    return get_task("sudoku", num_train=32, blanks=4, reward_funcs=[variety, solved],
                    reward_weights=[1.0, 0.0])  # fmt: skip


def worker(output_dir: str) -> None:
    """Each run's final weights on this rank; under FSDP also both rollout paths' tokens."""
    from unmask.sampling import Sampler, SamplerConfig
    from unmask.train.rl import RLTrainer
    from unmask.train.sft import SFTTrainer

    torch.set_num_threads(1)
    out = Path(output_dir)
    results: dict[str, object] = {}
    for run in RUNS:
        if run == "sft":
            trainer = SFTTrainer(_sft_config(out / run, save_every=2))
        elif run == "value":
            config = _rl_config(out / run, "tracerl", save_every=2, **VALUE)
            trainer = RLTrainer(config, task=_task())
        else:
            trainer = RLTrainer(_rl_config(out / run, run, save_every=2))
        trainer.train()
        results[run] = _whole(trainer.parallel, trainer.model)
        if run == "value":
            results["value_model"] = _whole(trainer.value.parallel, trainer.value.model)
        if run == "tracerl" and trainer.parallel.sharded:
            sampler = Sampler(SamplerConfig(gen_length=8, temperature=1.0))
            prompts = ["1203", "3012"]  # the same on both ranks: sharded forwards in lockstep
            through_shards = sampler.generate(trainer.core, prompts, seed=5).completion_ids
            with trainer.parallel.whole(trainer.core) as whole:
                gathered = sampler.generate(whole, prompts, seed=5).completion_ids
            results["rollouts"] = (through_shards, gathered)
        results["sharded"] = trainer.parallel.sharded
    rank = int(os.environ.get("RANK", "0"))
    torch.save(results, out / f"rank{rank}.pt")


def _whole(parallel, model) -> dict[str, torch.Tensor]:
    with parallel.whole(model) as whole:
        return {k: v.detach().clone() for k, v in whole.state_dict().items()}


def _launch(config: str, out: Path) -> dict:
    launch_ok(__file__, config, out)
    return torch.load(out / "rank0.pt", weights_only=False)


@pytest.mark.slow
def test_fsdp2_trains_as_ddp_and_resumes_on_one_process(tmp_path):
    ddp = _launch("ddp.yaml", tmp_path / "ddp")
    fsdp = _launch("fsdp.yaml", tmp_path / "fsdp")
    assert fsdp["sharded"] and not ddp["sharded"]
    for run in (*RUNS, "value_model"):
        for name, value in ddp[run].items():
            torch.testing.assert_close(fsdp[run][name], value, **TOLERANCE, msg=f"{run}: {name}")
    head = fsdp["value_model"]["value_head.weight"]
    assert head.abs().sum() > 0, "the value head (zero at start) was not trained"
    through_shards, gathered = fsdp["rollouts"]
    assert torch.equal(through_shards, gathered)

    # The FSDP2 checkpoint (consolidated weights, full optimizer state) resumes on 1 process.
    from unmask.models import DiffusionLM
    from unmask.train.checkpoint import latest_checkpoint
    from unmask.train.rl import RLTrainer

    checkpoint = latest_checkpoint(tmp_path / "fsdp" / "tracerl")
    assert checkpoint is not None
    loaded = DiffusionLM.from_pretrained(str(checkpoint), dtype="float32")
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, fsdp["tracerl"][name]), name
    resumed = RLTrainer(_rl_config(tmp_path / "fsdp" / "tracerl", "tracerl", max_steps=3,
                                   resume="latest"))  # fmt: skip
    resumed.train()
    assert resumed.steps_done == 2

    # The value model: its final folder holds the trained weights, and its checkpoint (weights
    # and optimizer state, sharded) loads on one process as saved.
    from unmask.objectives.value import ValueModel

    run = tmp_path / "fsdp" / "value"
    final = ValueModel.from_pretrained(run / "final_value", "float32", "cpu").state_dict()
    assert final.keys() == fsdp["value_model"].keys()
    assert all(torch.equal(v, fsdp["value_model"][k]) for k, v in final.items())
    config = _rl_config(run, "tracerl", max_steps=3, resume="latest", **VALUE)
    resumed = RLTrainer(config, task=_task())
    assert resumed._resume() == 2
    for name, value in resumed.value.core.state_dict().items():
        assert torch.equal(value, fsdp["value_model"][name]), name
    resumed.train()
    assert resumed.steps_done == 2


if __name__ == "__main__":
    worker(sys.argv[1])
