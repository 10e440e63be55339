"""FSDP2's options on 2 CPU processes (gloo, ``accelerate launch`` with ``fsdp.yaml``): the
bf16 mixed-precision policy, CPU offload, activation (gradient) checkpointing and LoRA through
``peft``, each a short SFT run (and LoRA also a TraceRL run with the adapter-disabled KL
reference). Every run trains with finite losses, and its saved model loads with
``DiffusionLM.from_pretrained`` holding the weights the processes trained:

- offload and checkpointing compute what the plain FSDP2 run computes: its weights within
  ``TOLERANCE``;
- bf16 computes in bf16 (gradients reduced in fp32, fp32 master weights): weights moved,
  finite, at most ``lr`` per step (Adam) from the plain run's;
- LoRA: the base is untouched, the adapters moved, ``final_lora`` holds them as trained and
  ``final`` is their merge.

The file is also the worker: ``accelerate launch tests/test_fsdp_options.py OUT_DIR``.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from two_processes import launch_ok

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}  # fp32, the same sums (recomputed, or on the host)
LR, STEPS = 1e-4, 2
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0}
SFT = {
    "model": "nano-block",
    "cpu": True,
    "max_steps": STEPS,
    "batch_size": 4,
    "grad_accum": 2,
    "lr": LR,
    "log_every": 1,
    "data": {"task": "sudoku", "options": {"num_train": 32, "blanks": 4}},
    "progress": False,
    "plots": False,
}
RUNS: dict[str, dict[str, Any]] = {
    "plain": {},
    "bf16": {"fsdp": {"bf16": True}},
    "offload": {"fsdp": {"cpu_offload": True}},
    "checkpointing": {"gradient_checkpointing": True},
    "lora": {"lora": LORA, "lr": 1e-2},
}
RL = {
    "model": "nano-block",
    "objective": "tracerl",
    "cpu": True,
    "max_steps": 1,
    "num_prompts": 2,
    "num_generations": 4,
    "micro_batch_size": 8,
    "lr": 1e-2,
    "beta": 0.04,
    "lora": LORA,
    "log_every": 1,
    "sampler": {"gen_length": 8, "temperature": 1.0},
    "progress": False,
    "plots": False,
}


def variety(prompts, completions, **_):
    """A reward an untrained policy varies on (the fraction of distinct characters): sudoku's
    own is 0 for every completion, which would leave no advantage and nothing to train."""
    return [len(set(c)) / max(len(c), 1) for c in completions]


def _task():
    from unmask.tasks.registry import get_task

    solved = get_task("sudoku").reward_funcs[1]  # the accuracy reward stays, weight 0
    return get_task("sudoku", num_train=32, blanks=4, reward_funcs=[variety, solved],
                    reward_weights=[1.0, 0.0])  # fmt: skip


def _weights(trainer) -> dict[str, torch.Tensor]:
    with trainer.parallel.whole(trainer.model) as whole:
        return {k: v.detach().clone() for k, v in whole.state_dict().items()}


def worker(out: Path) -> None:
    """Each run's start and final weights as this process gathers them."""
    from unmask.config import from_dict
    from unmask.train.rl import RLTrainer
    from unmask.train.rl_config import RLConfig
    from unmask.train.sft import SFTConfig, SFTTrainer

    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for name, changes in RUNS.items():
        config = from_dict(SFTConfig, {**SFT, **changes, "output_dir": str(out / name)})
        trainer = SFTTrainer(config)
        start = _weights(trainer)
        trainer.train()
        results[name] = {"start": start, "final": _weights(trainer),
                         "sharded": trainer.parallel.sharded}  # fmt: skip
    config = from_dict(RLConfig, {**RL, "output_dir": str(out / "rl_lora")})
    trainer = RLTrainer(config, task=_task())
    start = _weights(trainer)
    trainer.train()
    results["rl_lora"] = {"start": start, "final": _weights(trainer), "sharded": True}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out / "rank0.pt")


def _launch(out: Path) -> dict[str, Any]:
    launch_ok(__file__, "fsdp.yaml", out)
    return torch.load(out / "rank0.pt", weights_only=False)


def _saved(folder: Path) -> dict[str, torch.Tensor]:
    from unmask.models import DiffusionLM

    model = DiffusionLM.from_pretrained(str(folder), dtype="float32")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_fsdp2_options_train_and_save_loadable_models(tmp_path):
    from unmask.metrics import read_metrics
    from unmask.models import DiffusionLM
    from unmask.models.lora import merge_lora

    results = _launch(tmp_path)
    assert all(r["sharded"] for r in results.values())
    for name in (*RUNS, "rl_lora"):
        losses = [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r]
        assert losses and all(math.isfinite(x) for x in losses), (name, losses)

    plain = results["plain"]["final"]
    for name in ("plain", "bf16", "offload", "checkpointing"):
        final = results[name]["final"]
        assert _saved(tmp_path / name / "final").keys() == final.keys()
        for key, value in _saved(tmp_path / name / "final").items():
            assert torch.equal(value, final[key]), (name, key)
        moved = [k for k, v in final.items() if not torch.equal(v, results[name]["start"][k])]
        assert moved, f"{name}: no weight moved"
    for name in ("offload", "checkpointing"):
        for key, value in plain.items():
            torch.testing.assert_close(results[name]["final"][key], value, **TOLERANCE,
                                       msg=f"{name}: {key}")  # fmt: skip
    for key, value in results["bf16"]["final"].items():
        assert value.isfinite().all(), key
        assert (value - plain[key]).abs().max() <= 2 * LR * STEPS, key

    for name in ("lora", "rl_lora"):
        start, final = results[name]["start"], results[name]["final"]
        adapters = [k for k in final if "lora_" in k]
        assert adapters and all(torch.equal(final[k], start[k]) for k in final if "lora_" not in k)
        assert any(not torch.equal(final[k], start[k]) for k in adapters), name
        saved = _saved(tmp_path / name / "final_lora")
        assert saved.keys() == final.keys()
        assert all(torch.equal(saved[k], v) for k, v in final.items()), name
        model = DiffusionLM.from_pretrained(str(tmp_path / name / "final_lora"), dtype="float32")
        merge_lora(model)
        merged = _saved(tmp_path / name / "final")
        for key, value in model.state_dict().items():
            torch.testing.assert_close(merged[key], value, **TOLERANCE, msg=f"{name}: {key}")


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
