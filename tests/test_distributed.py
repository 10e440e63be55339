"""Data-parallel RL with 2 CPU processes (gloo), launched by ``accelerate launch`` with the
shipped ``configs/accelerate/ddp.yaml``: every rank samples its own prompts, whole groups stay on
one rank, gradients are averaged, and the checkpoint written once resumes on one process.

The file is also the worker: ``accelerate launch tests/test_distributed.py OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
STEPS, PROMPTS, GENERATIONS = 2, 2, 4


def _config(output_dir: str, **changes):
    from unmask.sampling import SamplerConfig
    from unmask.train.rl import RLConfig

    base = {
        "model": "nano-block",
        "output_dir": output_dir,
        "cpu": True,
        "max_steps": STEPS,
        "num_prompts": PROMPTS,
        "num_generations": GENERATIONS,
        "lr": 3e-3,
        "save_every": STEPS,
        "sampler": SamplerConfig(gen_length=8, temperature=1.0),
        "progress": False,
    }
    return RLConfig(**{**base, **changes})


def sevens(prompts, completions, **_):
    """Toy reward that an untrained policy already varies on: the fraction of '7's."""
    return [c.count("7") / max(len(c), 1) for c in completions]


def _task():
    from unmask.tasks.registry import get_task

    solved = get_task("sudoku").reward_funcs[1]  # the accuracy reward stays, weight 0
    return get_task(
        "sudoku", num_train=64, blanks=4, reward_funcs=[sevens, solved], reward_weights=[1.0, 0.0]
    )


def worker(output_dir: str) -> None:
    """One rank: train, recording the prompts this rank scored; save its final weights."""
    from unmask.train.rl import RLTrainer

    torch.set_num_threads(1)
    trainer = RLTrainer(_config(output_dir), task=_task())
    seen: list[list[str]] = []
    score = trainer.task.score

    def recording(prompts, completions, columns):
        seen.append(list(prompts))
        return score(prompts, completions, columns)

    trainer.task.score = recording
    trainer.train()
    state = {k: v.detach().clone() for k, v in trainer.core.state_dict().items()}
    torch.save(
        {"prompts": seen, "state": state, "world": trainer.accelerator.num_processes},
        Path(output_dir) / f"rank{trainer.accelerator.process_index}.pt",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_ranks_sample_different_prompts_and_keep_identical_weights(tmp_path):
    from unmask.models import from_preset
    from unmask.train.checkpoint import latest_checkpoint
    from unmask.train.rl import RLTrainer

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "configs/accelerate/ddp.yaml"),
        "--num_processes", "2", "--main_process_port", str(_free_port()),
        __file__, str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for step in range(STEPS):
        batches = [r["prompts"][step] for r in ranks]
        for batch in batches:  # whole groups: each prompt repeated num_generations times in a row
            groups = [batch[i : i + GENERATIONS] for i in range(0, len(batch), GENERATIONS)]
            assert len(groups) == PROMPTS and all(len(set(g)) == 1 for g in groups)
        assert not set(batches[0]) & set(batches[1]), "both ranks sampled the same prompt"

    start = from_preset("nano-block").state_dict()
    changed = 0
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), f"ranks differ at {name}"
        changed += not torch.equal(value, start[name])
    assert changed > 0, "no weight moved: the run trained nothing"

    # The checkpoint is written once (by the main process) and resumes on another world size.
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name == f"step-{STEPS:08d}"
    assert len(list((out / "checkpoints").iterdir())) == 1
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.equal(v, ranks[0]["state"][f"model.{k}"]) for k, v in saved.items())
    resumed = RLTrainer(
        _config(str(out), max_steps=STEPS + 1, resume="latest", save_every=0), task=_task()
    )
    resumed.train()  # one process now; the data position and rank 0's random state carry on
    assert resumed.steps_done == STEPS
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 2))


@pytest.mark.parametrize(
    "recipe", sorted((ROOT / "configs/families").glob("*/*.yaml")), ids=lambda p: p.parent.name
    + "/" + p.name,
)  # fmt: skip
def test_family_recipes_are_valid_configs(recipe):
    from unmask.config import load_config
    from unmask.eval.evaluate import EvalConfig
    from unmask.train.rl import RLConfig
    from unmask.train.sft import SFTConfig

    cls = {"sft": SFTConfig, "eval": EvalConfig}.get(recipe.stem, RLConfig)
    config = load_config(cls, recipe)
    if cls is RLConfig:  # the objective's options exist too
        from unmask.objectives import get_objective

        assert get_objective(config.objective, **config.objective_options).name == recipe.stem
    assert str(config.model).startswith(("runs/", "GSAI-ML/", "Dream-org/", "Gen-Verse/"))


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs/accelerate" / f"{name}.yaml"))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(name, "DEEPSPEED")
    assert config.distributed_type.value == expected and config.num_machines == 1


if __name__ == "__main__":
    worker(sys.argv[1])
