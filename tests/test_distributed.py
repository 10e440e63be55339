"""Data-parallel RL with 2 CPU processes (gloo), launched by ``accelerate launch`` with the
shipped ``configs/accelerate/ddp.yaml``: a one-process checkpoint resumes on two ranks, every
rank samples its own half of the step's prompts, whole groups stay on one rank, gradients are
averaged (also when one rank has nothing to train on), metrics merge the ranks, and the
checkpoint written once resumes on one process.

The file is also the worker: ``accelerate launch tests/test_distributed.py OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from two_processes import launch

ROOT = Path(__file__).resolve().parents[1]
STEPS, PROMPTS, GENERATIONS = 2, 4, 4  # PROMPTS: per step, over both ranks
FIRST = 1  # steps taken on one process before the two-rank run resumes
DISTRIBUTED = {
    "max_steps": FIRST + STEPS,
    "save_every": FIRST + STEPS,
    "resume": "latest",
    "loss_type": "dapo",
    "drop_zero_std_groups": True,
}


def _config(output_dir: str, **changes):
    from unmask.sampling import SamplerConfig
    from unmask.train.rl_config import RLConfig

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


def variety(prompts, completions, **_):
    """Toy reward that an untrained policy varies on: the fraction of distinct characters. On
    rank 1 it is constant, so with ``drop_zero_std_groups`` that rank has no view to train on."""
    if os.environ.get("RANK", "0") == "1":
        return [0.0] * len(completions)
    return [len(set(c)) / max(len(c), 1) for c in completions]


def _task():
    from unmask.tasks.registry import get_task

    solved = get_task("sudoku").reward_funcs[1]  # the accuracy reward stays, weight 0
    return get_task(
        "sudoku", num_train=64, blanks=4, reward_funcs=[variety, solved], reward_weights=[1.0, 0.0]
    )


def worker(output_dir: str, value: bool = False) -> None:
    """One rank: train, recording the prompts this rank scored; save its final weights (with
    ``value``, a fresh run with the value model on, whose weights are saved instead)."""
    from unmask.objectives.value import ValueConfig
    from unmask.train.rl import RLTrainer

    torch.set_num_threads(1)
    if value:
        config = _config(output_dir, value_model=ValueConfig(enabled=True, lr=1e-2),
                         drop_zero_std_groups=True)  # fmt: skip
    else:
        config = _config(output_dir, **DISTRIBUTED)
    trainer = RLTrainer(config, task=_task())
    seen: list[list[str]] = []
    score = trainer.task.score

    def recording(prompts, completions, columns):
        seen.append(list(prompts))
        return score(prompts, completions, columns)

    trainer.task.score = recording
    trainer.train()
    network = trainer.value.core if value else trainer.core
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    torch.save(
        {"prompts": seen, "state": state, "world": trainer.accelerator.num_processes},
        Path(output_dir) / f"rank{trainer.accelerator.process_index}.pt",
    )


def _launch(out: Path, *args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` this file's worker on two CPU ranks (DDP)."""
    return launch(__file__, "ddp.yaml", str(out), *args, timeout=300)


@pytest.mark.slow
def test_two_cpu_ranks_sample_different_prompts_and_keep_identical_weights(tmp_path):
    from unmask.train.checkpoint import latest_checkpoint, load_model_weights
    from unmask.train.rl import RLTrainer

    out = tmp_path / "ddp"
    # One process first: its checkpoint holds one random state, the two ranks resume from it.
    single = RLTrainer(_config(str(out), max_steps=FIRST, save_every=FIRST), task=_task())
    single.train()
    start = {k: v.detach().clone() for k, v in single.core.state_dict().items()}

    done = _launch(out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1 starts from its seed" in done.stderr

    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for step in range(STEPS):
        batches = [r["prompts"][step] for r in ranks]
        for batch in batches:  # whole groups: each prompt repeated num_generations times in a row
            groups = [batch[i : i + GENERATIONS] for i in range(0, len(batch), GENERATIONS)]
            assert len(groups) == PROMPTS // 2 and all(len(set(g)) == 1 for g in groups)
        assert not set(batches[0]) & set(batches[1]), "both ranks sampled the same prompt"

    changed = 0
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), f"ranks differ at {name}"
        changed += not torch.equal(value, start[name])
    assert changed > 0, "no weight moved: the run trained nothing"

    # Rank 1's groups all had one reward (all dropped); the logged fraction merges both ranks.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, FIRST + STEPS + 1))
    assert all(r["frac_reward_zero_std"] >= 0.5 for r in records[FIRST:])

    # The checkpoint is written once (by the main process) and resumes on another world size.
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name == f"step-{FIRST + STEPS:08d}"
    assert len(list((out / "checkpoints").iterdir())) == 2
    saved = RLTrainer(_config(str(out)), task=_task()).core
    load_model_weights(saved, checkpoint)
    assert all(torch.equal(v, ranks[0]["state"][k]) for k, v in saved.state_dict().items())
    resumed = RLTrainer(
        _config(str(out), max_steps=FIRST + STEPS + 1, resume="latest", save_every=0),
        task=_task(),
    )
    resumed.train()  # one process now; the data position and rank 0's random state carry on
    assert resumed.steps_done == FIRST + STEPS
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, FIRST + STEPS + 2))


def test_two_cpu_ranks_update_the_value_model_when_one_has_nothing_to_train(tmp_path):
    # Rank 1 keeps no rollout: its value update is a zero-weight spare pass, so rank 0's
    # gradient all-reduce is met (without it the run hangs), and the replicas stay equal.
    out = tmp_path / "value"
    done = _launch(out, "value")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), f"ranks differ at {name}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all("value_loss" in r for r in records)


@pytest.mark.parametrize(
    "recipe", sorted((ROOT / "configs/families").glob("*/*.yaml")), ids=lambda p: p.parent.name
    + "/" + p.name,
)  # fmt: skip
def test_family_recipes_are_valid_configs(recipe):
    from unmask.config import load_config
    from unmask.eval.evaluate import EvalConfig
    from unmask.train.rl_config import RLConfig
    from unmask.train.sft import SFTConfig

    cls = {"sft": SFTConfig, "eval": EvalConfig}.get(recipe.stem, RLConfig)
    config = load_config(cls, recipe)
    if cls is RLConfig:  # the objective's options exist too
        from unmask.objectives import get_objective

        name = get_objective(config.objective, **config.objective_options).name
        assert name == recipe.stem.removeprefix("rl_")
    prefixes = ("runs/", "GSAI-ML/", "Dream-org/", "Gen-Verse/", "google/")
    assert str(config.model).startswith(prefixes)


@pytest.mark.parametrize(
    ("kind", "stage", "trainer", "accumulates", "refused"),
    [
        ("MULTI_GPU", 0, "rl", True, None),
        ("FSDP", 1, "sft", False, "FSDP1 shards the weights"),
        ("FSDP", 2, "rl", True, None),  # FSDP2: the trainers shard the model themselves
        ("DEEPSPEED", 3, "sft", False, "ZeRO-3 shards the weights"),
        ("DEEPSPEED", 2, "sft", False, None),
        ("DEEPSPEED", 2, "sft", True, "grad_accum: 1"),
        ("DEEPSPEED", 2, "rl", True, "every micro-batch would take an optimizer step"),
    ],
)
def test_sharded_setups_a_trainer_would_run_wrongly_are_refused(
    kind, stage, trainer, accumulates, refused
):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from unmask.train.common import check_distribution

    acc = SimpleNamespace(
        distributed_type=DistributedType[kind],
        state=SimpleNamespace(
            deepspeed_plugin=SimpleNamespace(zero_stage=stage),
            fsdp_plugin=SimpleNamespace(fsdp_version=stage),
        ),
    )
    if refused is None:
        check_distribution(acc, trainer, accumulates)
    else:
        with pytest.raises(ValueError, match=refused):
            check_distribution(acc, trainer, accumulates)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs/accelerate" / f"{name}.yaml"))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(name, "DEEPSPEED")
    assert config.distributed_type.value == expected and config.num_machines == 1


if __name__ == "__main__":
    worker(sys.argv[1], value="value" in sys.argv[2:])
