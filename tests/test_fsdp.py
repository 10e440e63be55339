"""FSDP2 on 2 CPU processes (gloo), through ``accelerate launch`` with the shipped
``configs/accelerate/fsdp.yaml`` (accelerate itself ignores FSDP on CPU; the trainers shard
the model themselves, as on GPUs) against the same runs under ``ddp.yaml``: SFT, TraceRL and
AGRPO end with the same weights, rollouts from the gathered inference copy equal rollouts
sampled through the sharded model, and an FSDP2 checkpoint resumes on one process.

The file is also the worker: ``accelerate launch tests/test_fsdp.py OUT_DIR``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("sft", "tracerl", "agrpo")
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


def worker(output_dir: str) -> None:
    """Each run's final weights on this rank; under FSDP also both rollout paths' tokens."""
    from unmask.sampling import Sampler, SamplerConfig
    from unmask.train.rl import RLTrainer
    from unmask.train.sft import SFTTrainer

    torch.set_num_threads(1)
    out = Path(output_dir)
    results: dict[str, object] = {}
    for run in RUNS:
        trainer = (
            SFTTrainer(_sft_config(out / run, save_every=2))
            if run == "sft"
            else RLTrainer(_rl_config(out / run, run, save_every=2))
        )
        trainer.train()
        with trainer.parallel.whole(trainer.model) as whole:
            results[run] = {k: v.detach().clone() for k, v in whole.state_dict().items()}
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


def _launch(config: str, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "configs/accelerate" / config),
        "--num_processes", "2", "--main_process_port", str(_free_port()),
        __file__, str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out / "rank0.pt", weights_only=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp2_trains_as_ddp_and_resumes_on_one_process(tmp_path):
    ddp = _launch("ddp.yaml", tmp_path / "ddp")
    fsdp = _launch("fsdp.yaml", tmp_path / "fsdp")
    assert fsdp["sharded"] and not ddp["sharded"]
    for run in RUNS:
        for name, value in ddp[run].items():
            torch.testing.assert_close(fsdp[run][name], value, **TOLERANCE, msg=f"{run}: {name}")
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


if __name__ == "__main__":
    worker(sys.argv[1])
