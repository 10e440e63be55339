"""Checkpoints across world sizes: the optimizer state is written with
``torch.distributed.checkpoint`` (each FSDP2 process its own shards) and resumes on another
number of processes. One SFT config and seed, 4 steps with a checkpoint at 2 and 4, on 1
process (no sharding) and on 2 (FSDP2, gloo, ``accelerate launch`` with ``fsdp.yaml``):

- 2 -> 1 and 1 -> 2: a run resumed at step 2 on the other world size ends with the weights of
  the uninterrupted run within ``TOLERANCE`` (fp32: steps 3 and 4 sum over shards in another
  order), and a checkpoint loaded on the other world size holds exactly the optimizer state
  that was saved (resharding copies bytes);
- 2 -> 2: resumed on as many processes, the run is bit-exact;
- the FSDP2 checkpoint's model loads with ``DiffusionLM.from_pretrained``, both processes
  wrote optimizer shards and the manifest lists and digests them.

The file is also the worker: ``accelerate launch tests/test_fsdp_checkpoint.py OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from two_processes import launch_ok

# As tests/test_global_batch.py: at lr 1e-4 the 1- and 2-process runs of one config agree to
# this (Adam moves an entry whose rounding differs by up to the learning rate).
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
SFT = {
    "model": "nano-block",
    "cpu": True,
    "max_steps": 4,
    "save_every": 2,
    "batch_size": 4,
    "grad_accum": 2,
    "lr": 1e-4,
    "data": {"task": "sudoku", "options": {"num_train": 32, "blanks": 4}},
    "progress": False,
    "plots": False,
}


def _trainer(output_dir: Path, **changes: Any):
    from unmask.config import from_dict
    from unmask.train.sft import SFTConfig, SFTTrainer

    return SFTTrainer(from_dict(SFTConfig, {**SFT, "output_dir": str(output_dir), **changes}))


def _checkpoint(run: Path, step: int) -> str:
    return str(run / "checkpoints" / f"step-{step:08d}")


def _weights(trainer) -> dict[str, torch.Tensor]:
    with trainer.parallel.whole(trainer.model) as whole:
        return {k: v.detach().clone() for k, v in whole.state_dict().items()}


def _optimizer(trainer) -> dict[str, Any]:
    """The whole optimizer state keyed by parameter names (on the main process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    options = StateDictOptions(full_state_dict=True, cpu_offload=trainer.parallel.sharded)
    return get_optimizer_state_dict(trainer.model, optimizer, options=options)


def _loaded(output_dir: Path, checkpoint: str) -> dict[str, Any]:
    """Weights and optimizer state right after loading ``checkpoint`` (no step taken)."""
    probe = _trainer(output_dir, resume=checkpoint)
    assert probe._resume() == SFT["max_steps"]
    return {"weights": _weights(probe), "optimizer": _optimizer(probe)}


def worker(out: Path) -> None:
    """The 2-process runs: uninterrupted, resumed from the 1-process checkpoint and from its
    own, and the 1-process final checkpoint as loaded here."""
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    two = _trainer(out / "two")
    two.train()
    results["two"] = {"weights": _weights(two), "optimizer": _optimizer(two)}
    for name, source in (("from_one", "one"), ("two_again", "two")):
        resumed = _trainer(out / name, resume=_checkpoint(out / source, 2))
        resumed.train()
        results[name] = {"weights": _weights(resumed), "sharded": resumed.parallel.sharded}
    results["one_loaded"] = _loaded(out / "probe", _checkpoint(out / "one", 4))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out / "rank0.pt")


def _launch(out: Path) -> dict[str, Any]:
    launch_ok(__file__, "fsdp.yaml", out)
    return torch.load(out / "rank0.pt", weights_only=False)


def _assert_same_optimizer(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got["state"].keys() == expected["state"].keys()
    for name, entries in expected["state"].items():
        assert entries.keys() == got["state"][name].keys(), name
        for key, value in entries.items():
            assert torch.equal(got["state"][name][key], value), (name, key)
    assert got["param_groups"] == expected["param_groups"]


def _assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str):
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(
            got[name], value, **TOLERANCE, msg=lambda m, name=name: f"{what}: {name}: {m}"
        )


@pytest.mark.slow
def test_fsdp2_optimizer_checkpoints_resume_across_world_sizes(tmp_path):
    from unmask.integrity import file_sha256
    from unmask.models import DiffusionLM

    torch.set_num_threads(1)
    one = _trainer(tmp_path / "one")
    start = _weights(one)
    one.train()
    single = {"weights": _weights(one), "optimizer": _optimizer(one)}
    moved = [k for k, v in single["weights"].items() if not torch.equal(v, start[k])]
    assert moved, "no weight moved: the comparisons would be empty"

    ranks = _launch(tmp_path)
    two = ranks["two"]
    assert ranks["from_one"]["sharded"] and ranks["two_again"]["sharded"]

    # 2 -> 1: resumed on one process, the run goes on as the uninterrupted 2-process one.
    from_two = _trainer(tmp_path / "from_two", resume=_checkpoint(tmp_path / "two", 2))
    from_two.train()
    assert not from_two.parallel.sharded
    _assert_close(_weights(from_two), two["weights"], "2 -> 1")
    # 1 -> 2 likewise; 2 -> 2 is bit-exact.
    _assert_close(ranks["from_one"]["weights"], single["weights"], "1 -> 2")
    for name, value in two["weights"].items():
        assert torch.equal(ranks["two_again"]["weights"][name], value), name

    # Loaded on the other world size, a checkpoint holds exactly what was saved.
    loaded = _loaded(tmp_path / "probe", _checkpoint(tmp_path / "two", 4))
    _assert_same_optimizer(loaded["optimizer"], two["optimizer"])
    _assert_same_optimizer(ranks["one_loaded"]["optimizer"], single["optimizer"])
    for got, expected in ((loaded, two), (ranks["one_loaded"], single)):
        for name, value in expected["weights"].items():
            assert torch.equal(got["weights"][name], value), name

    # The FSDP2 checkpoint: a model folder, and both processes' optimizer shards, digested.
    checkpoint = Path(_checkpoint(tmp_path / "two", 4))
    model = DiffusionLM.from_pretrained(str(checkpoint), dtype="float32")
    for name, value in model.state_dict().items():
        assert torch.equal(value, two["weights"][name]), name
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    shards = {"optimizer/.metadata", "optimizer/__0_0.distcp", "optimizer/__1_0.distcp"}
    assert shards <= set(manifest["sha256"])
    for name in shards:
        assert file_sha256(checkpoint / name) == manifest["sha256"][name]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
