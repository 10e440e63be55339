"""TraceRL with and without the diffusion value model on the Sudoku quickstart task.

Prints one JSON line per measurement:

1. ``warmup``: a value model trained on rollouts of the fixed starting policy (policy lr 0);
2. ``variance``: on the same fresh rollout batches, the policy gradient of the TraceRL loss
   with group advantages and with the warmed value model's token advantages; across batches,
   the variance of the estimate (trace of its covariance), per scored token, and the cosine
   between the two mean gradients;
3. ``curve``: TraceRL from the same start, without and with a value model (fresh, zero head),
   each for the same wall time: one line per step, then held-out accuracy (``eval``; also
   of the starting policy).

    unmask sft configs/sft_sudoku_tiny.yaml output_dir=/tmp/v6_sft
    python benchmarks/value_model.py --model /tmp/v6_sft/final --budget-s 90
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from unmask.objectives import (
    LossInputs,
    group_advantages,
    normalizers,
    policy_loss,
    token_logprobs,
)
from unmask.objectives.tracerl import TraceRL
from unmask.objectives.value import ValueConfig
from unmask.sampling import SamplerConfig
from unmask.train.rl import RLTrainer
from unmask.train.rl_config import RLConfig, RLEval


def emit(record: dict[str, Any]) -> None:
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in record.items()}),
          flush=True)  # fmt: skip


def config(args: argparse.Namespace, name: str, value: bool, lr: float) -> RLConfig:
    return RLConfig(
        model=args.model,
        output_dir=f"{args.output_dir}/{name}",
        seed=args.seed,
        num_prompts=args.prompts,
        num_generations=args.generations,
        max_steps=10_000,
        lr=lr,
        sampler=SamplerConfig(gen_length=20, temperature=1.0),
        progress=False,
        value_model=ValueConfig(enabled=value, lr=args.value_lr, iterations=args.value_iterations),
        eval=RLEval(limit=args.eval_limit, sampler=SamplerConfig(gen_length=20)),
    )


def warm_value(args: argparse.Namespace) -> RLTrainer:
    trainer = RLTrainer(config(args, "warmup", value=True, lr=0.0))
    began = time.perf_counter()
    for step in range(args.warmup_steps):
        trainer.steps_done = step
        m = trainer.step()
        emit({"phase": "warmup", "step": step + 1, "elapsed_s": time.perf_counter() - began,
              "value_loss": m["value_loss"], "value_explained_var": m["value_explained_var"],
              "reward": m["reward"]})  # fmt: skip
    return trainer


def gradient_variance(args: argparse.Namespace, trainer: RLTrainer) -> None:
    """Paired estimates on the same rollouts; the policy and value model stay fixed."""
    policy, task, learner = trainer.core, trainer.task, trainer.value
    assert learner is not None
    params = [p for p in policy.parameters() if p.requires_grad]
    objective = TraceRL(two_stream=policy.layout == "block")
    g = torch.Generator().manual_seed(args.seed + 1)
    grads: dict[str, list[torch.Tensor]] = {"group": [], "value": []}
    tokens = 0
    for k in range(args.batches):
        rows = torch.randperm(len(trainer.prompts), generator=g)[: args.prompts].tolist()
        batch = trainer.prompts.select(rows)
        prompts = [p for p in batch["prompt"] for _ in range(args.generations)]
        columns = {c: [v for v in batch[c] for _ in range(args.generations)]
                   for c in batch.column_names if c != "prompt"}  # fmt: skip
        policy.eval()
        rollout = trainer.sampler.generate(policy, prompts, seed=10_000 + k)
        completions = rollout.completion_texts(trainer.tokenizer)
        rewards = torch.tensor(task.weighted_sum(task.score(prompts, completions, columns)))
        adv = group_advantages(rewards, args.generations, "group")
        kept = torch.ones(len(prompts), dtype=torch.bool)
        token_adv, _ = learner.step(learner.views(rollout), rollout, adv.advantages, None, kept,
                                    train=False)  # fmt: skip
        views = objective.views(rollout)
        divisors = normalizers(rollout, "dr_grpo")
        tokens += int(views.scored.sum())
        for name, advantages in (("group", adv.advantages), ("value", token_adv)):
            per_token = views.per_token(advantages)
            logp = token_logprobs(policy, views, 64, temperature=1.0)
            inputs = LossInputs(logp, logp.detach(), per_token, views.scored, views.weights,
                                views.rollout_index, divisors)  # fmt: skip
            loss = policy_loss(inputs).loss
            flat = torch.cat([x.flatten() for x in torch.autograd.grad(loss, params)])
            grads[name].append(flat.double())
    stats = {}
    for name, rows in grads.items():
        stack = torch.stack(rows)
        mean = stack.mean(0)
        var = float(((stack - mean) ** 2).sum(1).mean())  # trace of the covariance
        stats[name] = (mean, var)
        emit({"phase": "variance", "advantage": name, "batches": args.batches,
              "rollouts_per_batch": args.prompts * args.generations,
              "grad_variance": var, "grad_variance_per_token": var * tokens / args.batches,
              "mean_grad_sq_norm": float(mean.square().sum()),
              "noise_to_signal": var / float(mean.square().sum())})  # fmt: skip
    cosine = torch.nn.functional.cosine_similarity(stats["group"][0], stats["value"][0], dim=0)
    emit({"phase": "variance", "variance_ratio_value_over_group":
          stats["value"][1] / stats["group"][1], "mean_grad_cosine": float(cosine)})  # fmt: skip


def curves(args: argparse.Namespace) -> None:
    for arm, value in (("group", False), ("value", True)):
        trainer = RLTrainer(config(args, f"curve-{arm}", value=value, lr=args.lr))
        if not value:  # the starting policy, once
            emit({"phase": "eval", "arm": "start", "steps": 0, "puzzles": args.eval_limit,
                  "accuracy": trainer.evaluate()["eval/accuracy"]})  # fmt: skip
        began, step = time.perf_counter(), 0
        while time.perf_counter() - began < args.budget_s:
            trainer.steps_done = step
            m = trainer.step()
            step += 1
            emit({"phase": "curve", "arm": arm, "step": step,
                  "elapsed_s": time.perf_counter() - began, "reward": m["reward"],
                  "solved": m.get("reward/sudoku_solved/mean"), "step_s": m["step_s"],
                  "value_explained_var": m.get("value_explained_var")})  # fmt: skip
        summary = trainer.evaluate()
        emit({"phase": "eval", "arm": arm, "steps": step, "wall_s": time.perf_counter() - began,
              "accuracy": summary["eval/accuracy"], "puzzles": args.eval_limit})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="runs/sft_sudoku/final", help="the starting policy")
    parser.add_argument("--output-dir", default="/tmp/value_model_bench")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4, help="policy learning rate")
    parser.add_argument("--value-lr", type=float, default=1e-3)
    parser.add_argument("--value-iterations", type=int, default=1)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--batches", type=int, default=6, help="rollout batches for the variance")
    parser.add_argument("--budget-s", type=float, default=90.0, help="wall time of each curve")
    parser.add_argument("--eval-limit", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=["variance", "curve"],
                        choices=["variance", "curve"])  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if "variance" in args.only:
        gradient_variance(args, warm_value(args))
    if "curve" in args.only:
        curves(args)


if __name__ == "__main__":
    main()
