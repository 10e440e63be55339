"""Multi-node FSDP2 on one machine: two "nodes" of one CPU process each (gloo), each started by
its own ``accelerate launch --config_file configs/accelerate/fsdp_multinode.yaml`` with
``--machine_rank 0`` and ``1``, meeting at a c10d rendezvous on 127.0.0.1, as the SLURM script
of docs/scale.md starts them. Both run two FSDP2 SFT steps through ``unmask sft ... --resume``
(no checkpoint yet: a requeue loop's first attempt starts at step 0) and end with the weights of
the same run on one node with two processes (``fsdp.yaml``); the checkpoint loads with
``DiffusionLM.from_pretrained``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from two_processes import environment, free_port

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "configs" / "accelerate"
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}  # the same sums on the same ranks: equal in practice
CONFIG = {
    "model": "nano-block",
    "cpu": True,
    "max_steps": 2,
    "save_every": 2,
    "batch_size": 4,
    "grad_accum": 1,
    "log_every": 1,
    "data": {"task": "sudoku", "options": {"num_train": 32, "blanks": 4}},
    "eval": {"every": 0},
    "progress": False,
    "plots": False,
}


def _command(config_file: str, recipe: Path, *launch: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ACCELERATE / config_file), *launch,
        "-m", "unmask.cli", "sft", str(recipe), "--resume",
    ]  # fmt: skip


def _recipe(tmp_path: Path, name: str) -> tuple[Path, Path]:
    output = tmp_path / name
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(output)}))
    return recipe, output


def _wait(processes: list[subprocess.Popen]) -> None:
    try:
        outputs = [p.communicate(timeout=300)[1] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p, err in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from unmask.models import DiffusionLM

    model = DiffusionLM.from_pretrained(str(folder), dtype="float32")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_multinode_config_shards_as_the_single_node_one():
    multi, single = (
        yaml.safe_load((ACCELERATE / f).read_text()) for f in ("fsdp_multinode.yaml", "fsdp.yaml")
    )
    assert multi["fsdp_config"] == single["fsdp_config"]
    assert multi["distributed_type"] == single["distributed_type"] == "FSDP"
    # c10d's endpoint is passed by accelerate only when same_network is false
    assert multi["rdzv_backend"] == "c10d" and multi["same_network"] is False
    assert multi["num_machines"] > 1 and multi["num_processes"] % multi["num_machines"] == 0


@pytest.mark.slow
def test_two_nodes_of_one_process_train_as_one_node_of_two(tmp_path):
    env = environment()
    run = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    recipe, multi = _recipe(tmp_path, "multinode")
    port = str(free_port())

    def node(rank: int) -> list[str]:
        launch = [
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", port,
        ]  # fmt: skip
        return _command("fsdp_multinode.yaml", recipe, *launch)

    nodes = [subprocess.Popen(node(rank), **run) for rank in (0, 1)]
    _wait(nodes)

    recipe, single = _recipe(tmp_path, "single")
    launch = ("--num_processes", "2", "--main_process_port", str(free_port()))
    _wait([subprocess.Popen(_command("fsdp.yaml", recipe, *launch), **run)])

    from unmask.metrics import read_metrics
    from unmask.train.checkpoint import latest_checkpoint

    for output in (multi, single):  # both steps ran, from step 0 (no checkpoint yet)
        assert [r["step"] for r in read_metrics(output) if "loss" in r] == [1, 2]
    checkpoint = latest_checkpoint(multi)
    assert checkpoint is not None and checkpoint.name.endswith("2"), checkpoint
    across_nodes, one_node = _weights(checkpoint), _weights(single / "final")
    assert across_nodes.keys() == one_node.keys()
    for name, value in one_node.items():
        torch.testing.assert_close(across_nodes[name], value, **TOLERANCE, msg=name)
    for name, value in _weights(multi / "final").items():
        assert torch.equal(across_nodes[name], value), name
