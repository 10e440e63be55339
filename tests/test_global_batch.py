"""A global batch: one config and seed trained on 1 process and on 2 (gloo, CPU, launched by
``accelerate launch`` with the shipped ``ddp.yaml`` and ``fsdp.yaml``) ends with the same
weights, for TraceRL (KL reference, two optimizer passes), AGRPO over 3 prompts (uneven shares:
1 and 2 groups), TraceRL with ``drop_zero_std_groups`` and a reward that leaves the two
processes different numbers of kept groups (per-sequence normalisation), and SFT with
micro-batches of 3 rows (1 and 2 per process). The parts it rests on are checked alone, fast:
a group's completions, a group's views and a row's SFT noise are the same alone and beside
others (of other prompt lengths), one stream samples as ``torch.multinomial``, and the shares.

The file is also the worker: ``accelerate launch tests/test_global_batch.py OUT_DIR``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from two_processes import launch_ok

# fp32: the same sums, split over processes and micro-batches in another order (gradients agree
# to ~1e-6 of their largest entry). Adam divides each gradient by its own size, so an entry
# near zero whose rounding differs moves its weight by up to the learning rate: a small one
# keeps that below the tolerance, and the logged loss and gradient norm (which Adam's scale
# invariance would not show in the weights) are compared too.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
LOGGED = {
    "rl": ("loss", "grad_norm", "reward", "frac_reward_zero_std"),
    "sft": ("loss", "grad_norm", "nll", "mask_ratio"),
}
SFT = {
    "model": "nano-block",
    "cpu": True,
    "max_steps": 3,
    "batch_size": 3,
    "grad_accum": 2,
    "lr": 1e-4,
    "log_every": 1,
    "data": {"task": "sudoku", "options": {"num_train": 32, "blanks": 4}},
    "progress": False,
    "plots": False,
}
RUNS = {
    "tracerl": {"objective": "tracerl", "beta": 0.04, "num_iterations": 2},
    "agrpo": {"objective": "agrpo", "num_prompts": 3},
    "dropped": {
        "objective": "tracerl",
        "drop_zero_std_groups": True,
        "loss_type": "grpo",
        "num_iterations": 2,
    },
}


def _config(output_dir: Path, **changes):
    from unmask.config import from_dict
    from unmask.train.rl_config import RLConfig

    base = {
        "model": "nano-block",
        "output_dir": str(output_dir),
        "cpu": True,
        "max_steps": 3,
        "num_prompts": 4,
        "num_generations": 4,
        "micro_batch_size": 6,
        "lr": 1e-4,
        "sampler": {"gen_length": 8, "temperature": 1.0},
        "progress": False,
        "plots": False,
    }
    return from_dict(RLConfig, {**base, **changes})


def sevens_of_half(prompts, completions, **_):
    """The fraction of '7's for prompts of even character sum, else 0 (a group with one
    reward: dropped), so processes keep different numbers of groups."""
    return [
        c.count("7") / max(len(c), 1) if sum(map(ord, p)) % 2 == 0 else 0.0
        for p, c in zip(prompts, completions, strict=True)
    ]


def _task():
    from unmask.tasks.registry import get_task

    solved = get_task("sudoku").reward_funcs[1]  # the accuracy reward stays, weight 0
    return get_task("sudoku", num_train=32, blanks=4, reward_funcs=[sevens_of_half, solved],
                    reward_weights=[1.0, 0.0])  # fmt: skip


def train_all(output_dir: Path) -> dict[str, dict]:
    """Each run's start and final weights (and, in RL, this process's kept rollouts per
    step)."""
    from unmask.config import from_dict
    from unmask.train.rl import RLTrainer
    from unmask.train.sft import SFTConfig, SFTTrainer

    torch.set_num_threads(1)
    results: dict[str, dict] = {}
    sft = SFTTrainer(from_dict(SFTConfig, {**SFT, "output_dir": str(output_dir / "sft")}))
    start = {k: v.detach().clone() for k, v in sft.core.state_dict().items()}
    sft.train()
    results["sft"] = {"start": start, **_final(sft)}
    for run, changes in RUNS.items():
        trainer = RLTrainer(_config(output_dir / run, **changes), task=_task())
        start = {k: v.detach().clone() for k, v in trainer.core.state_dict().items()}
        kept: list[int] = []
        optimize = trainer._optimize

        def recording(rollout, advantages, keep, optimize=optimize, kept=kept):
            kept.append(int(keep.sum()))
            return optimize(rollout, advantages, keep)

        trainer._optimize = recording
        trainer.train()
        results[run] = {"start": start, "kept": kept, **_final(trainer)}
    return results


def _final(trainer) -> dict:
    with trainer.parallel.whole(trainer.model) as whole:
        final = {k: v.detach().clone() for k, v in whole.state_dict().items()}
    return {"final": final, "sharded": trainer.parallel.sharded}


def _launch(config: str, out: Path) -> list[dict]:
    launch_ok(__file__, config, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


PROMPTS = ["1203"] * 3 + ["30121234"] * 3 + ["12"] * 3  # 3 groups of 3, unequal lengths
SEEDS = [11, 22, 33]


@pytest.mark.parametrize("preset", ["nano-block", "nano-full"])
@pytest.mark.parametrize("remasking", ["low_confidence", "random", "threshold"])
def test_a_group_samples_the_same_alone_or_beside_others(preset, remasking):
    from unmask.models import from_preset
    from unmask.sampling import Sampler, SamplerConfig

    model = from_preset(preset, seed=2).eval()
    # A threshold at the untrained model's peak probabilities: rows take different numbers of
    # steps, so a group idles while others still decode.
    config = SamplerConfig(gen_length=8, block_length=4, temperature=1.0, remasking=remasking,
                           threshold=0.011, return_logprobs=True)  # fmt: skip
    whole = Sampler(config).generate(model, PROMPTS, group_seeds=SEEDS)
    for g in range(3):
        alone = Sampler(config).generate(
            model, PROMPTS[3 * g : 3 * g + 3], group_seeds=SEEDS[g : g + 1]
        )
        rows = slice(3 * g, 3 * g + 3)
        assert torch.equal(alone.completion_ids, whole.completion_ids[rows])
        assert torch.equal(alone.steps, whole.steps[rows])
        torch.testing.assert_close(alone.logprobs, whole.logprobs[rows])
    assert not torch.equal(whole.completion_ids[0], whole.completion_ids[1])  # rows differ
    if remasking == "threshold":
        assert len(set(whole.num_steps.tolist())) > 1


def test_one_stream_draws_as_multinomial():
    from unmask.sampling.draws import Draws
    from unmask.sampling.remasking import propose

    logits = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(0))
    draws = Draws(3, torch.device("cpu"), seed=7)
    tokens = propose(logits, 49, 0.8, 0, 1.0, draws.exponential(logits.shape, torch.ones(3))).tokens
    probs = (logits / 0.8).index_fill(-1, torch.tensor([49]), float("-inf")).softmax(-1)
    expected = torch.multinomial(probs.view(-1, 50), 1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(tokens.flatten(), expected.flatten())


@pytest.mark.parametrize("preset", ["nano-block", "nano-full"])
def test_a_group_gets_the_same_views_alone_or_beside_others(preset):
    from unmask.models import from_preset
    from unmask.objectives import OBJECTIVES, get_objective, token_logprobs
    from unmask.objectives.grouped import grouped_views
    from unmask.sampling import Sampler, SamplerConfig

    model = from_preset(preset, seed=2).eval()
    config = SamplerConfig(gen_length=8, block_length=4, temperature=1.0, return_logprobs=True)
    rollout = Sampler(config).generate(model, PROMPTS, group_seeds=SEEDS)

    def per_rollout(objective, rollout, seeds):  # the weighted log-prob sum of each rollout
        views = grouped_views(objective, rollout, [torch.Generator().manual_seed(s) for s in seeds])
        with torch.no_grad():
            logp = token_logprobs(model, views, 64)
        sums = (logp * views.weights).sum(dim=1)
        return torch.zeros(rollout.batch_size).index_add(0, views.rollout_index, sums)

    for name, cls in sorted(OBJECTIVES.items()):
        two_stream = cls.supports_two_stream and model.layout == "block"
        objective = get_objective(name, **({"two_stream": True} if two_stream else {}))
        whole = per_rollout(objective, rollout, SEEDS)
        for g in range(3):
            alone = per_rollout(
                objective, rollout.select(slice(3 * g, 3 * g + 3)), SEEDS[g : g + 1]
            )
            torch.testing.assert_close(alone, whole[3 * g : 3 * g + 3], msg=name)


@pytest.mark.parametrize("objective", ["block", "random_mask"])
def test_a_rows_sft_noise_is_the_same_alone_or_beside_others(objective):
    from unmask.models import from_preset
    from unmask.objectives.sft_loss import sample_noise
    from unmask.objectives.views import collate

    tok = from_preset("nano-block", seed=4).tokenizer
    pairs = [(tok(p)["input_ids"], tok(c)["input_ids"]) for p, c in
             [("1", "23412341234"), ("123412", "3412"), ("12341", "234123")]]  # fmt: skip

    def noise(rows: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each row's ``t`` and mask over its completion, the rows collated together."""
        batch = collate([pairs[r] for r in rows], 0, 4, "zero", whole_blocks=True)
        drawn = sample_noise(batch, objective, 0.1, 1.0,
                             [torch.Generator().manual_seed(r) for r in rows])  # fmt: skip
        return [(drawn.t[i][batch.completion[i]], drawn.mask[i][batch.completion[i]])
                for i in range(len(rows))]  # fmt: skip

    together = noise([0, 1, 2])
    for r in range(3):
        ((t, mask),) = noise([r])
        assert torch.equal(t, together[r][0]) and torch.equal(mask, together[r][1])


def test_shares_are_contiguous_whole_and_refuse_an_empty_process():
    from types import SimpleNamespace

    from unmask.train.global_batch import StepGroups, check_share, share

    ranks = [SimpleNamespace(process_index=r, num_processes=2) for r in (0, 1)]
    assert [share(3, a) for a in ranks] == [range(0, 1), range(1, 3)]
    groups = StepGroups.share(0, 5, 3, 4, ranks[1])
    assert groups.rows == slice(4, 12) and len(set(groups.seeds("sample"))) == 2
    assert groups.seeds("sample") != groups.seeds("views/0")
    assert StepGroups.share(0, 5, 3, 4, ranks[0]).seeds("sample") != groups.seeds("sample")
    with pytest.raises(ValueError, match=r"num_prompts \(1\).*number of processes \(2\)"):
        check_share("num_prompts", 1, 2)


@pytest.mark.slow
def test_one_and_two_processes_train_the_same_run_under_ddp_and_fsdp2(tmp_path):
    from unmask.metrics import read_metrics

    single = train_all(tmp_path / "single")
    for run, result in single.items():
        moved = [k for k, v in result["final"].items() if not torch.equal(v, result["start"][k])]
        assert moved, f"{run}: no weight moved, the comparison would be empty"
    for strategy in ("ddp.yaml", "fsdp.yaml"):
        ranks = _launch(strategy, tmp_path / strategy)
        for run, result in single.items():
            two = ranks[0][run]
            assert two["sharded"] == (strategy == "fsdp.yaml")
            for name, value in result["final"].items():
                torch.testing.assert_close(two["final"][name], value, **TOLERANCE,
                                           msg=f"{strategy} {run}: {name}")  # fmt: skip
            logged = [read_metrics(tmp_path / name / run) for name in ("single", strategy)]
            assert len(logged[0]) == len(logged[1]) == 3
            for one, two in zip(*logged, strict=True):
                for key in LOGGED["sft" if run == "sft" else "rl"]:
                    assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-7), (run, key)
            if run == "sft":
                continue
            kept = [r[run]["kept"] for r in ranks]
            assert [a + b for a, b in zip(*kept, strict=True)] == result["kept"], run
        uneven = ranks[0]["dropped"]["kept"], ranks[1]["dropped"]["kept"]
        assert any(a != b for a, b in zip(*uneven, strict=True)), uneven


if __name__ == "__main__":
    out = Path(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))
    torch.save(train_all(out), out / f"rank{rank}.pt")
