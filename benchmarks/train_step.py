"""One optimizer step per objective on the same model and rollout batch.

Prints one JSON line per objective (scored tokens per second, views, peak memory), each in a
fresh subprocess so its peak resident memory is its own, then the ratio of TraceRL's packed
block rows (``two_stream``) to one forward per step, measured in the same run.

    python benchmarks/train_step.py                       # small-block model, b=4
    python benchmarks/train_step.py --model nano --prompts 2 --gen-length 16   # quick check
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from _runner import run_settings

SETTINGS = {
    "tracerl": ("tracerl", {}),
    "tracerl/packed": ("tracerl", {"two_stream": True}),
    "agrpo": ("agrpo", {"mc_samples": 8}),
    "diffu_grpo": ("diffu_grpo", {}),
    "coupled": ("coupled", {}),
    "random_mask": ("random_mask", {}),
    "elbo": ("elbo", {"mc_samples": 2}),
}


def run_one(args: argparse.Namespace) -> dict:
    import torch

    from unmask.models import from_preset
    from unmask.objectives import (
        ClipConfig,
        LossInputs,
        get_objective,
        normalizers,
        policy_loss,
        token_logprobs,
    )
    from unmask.sampling import Sampler, SamplerConfig

    torch.set_num_threads(args.threads)
    name, options = SETTINGS[args.one]
    model = from_preset(f"{args.model}-block", block_size=args.block_length)
    config = SamplerConfig(
        gen_length=args.gen_length, temperature=1.0, stop_at_eos=False, return_logprobs=True
    )
    gen = torch.Generator().manual_seed(0)
    vocab = len(model.tokenizer)
    prompts = [
        torch.randint(5, vocab - 1, (args.prompt_length,), generator=gen).tolist()
        for _ in range(args.prompts)
        for _ in range(args.generations)
    ]
    rollout = Sampler(config).generate(model.eval(), prompts, seed=0)
    objective = get_objective(name, **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    advantages = torch.randn(len(prompts), generator=gen)
    divisors = normalizers(rollout, objective.loss_type)
    kw = {"temperature": 1.0} if objective.scores_sampling_distribution else {}
    model.train()
    start = time.perf_counter()
    views = objective.views(rollout, torch.Generator().manual_seed(1))
    old = views.per_token(rollout.logprobs) if objective.old_logprobs == "sampler" else None
    scored = 0
    for first in range(0, len(views), args.micro_batch):
        chunk = views.select(slice(first, first + args.micro_batch))
        logp = token_logprobs(model, chunk, len(chunk), **kw)
        inputs = LossInputs(
            logp,
            logp.detach() if old is None else old[first : first + args.micro_batch],
            advantages,
            chunk.scored,
            chunk.weights,
            chunk.rollout_index,
            divisors,
            lengths=rollout.completion_lengths,
        )
        out = policy_loss(inputs, ClipConfig(level=objective.importance_sampling_level))
        out.loss.backward()
        scored += int(chunk.scored.sum())
    optimizer.step()
    wall = time.perf_counter() - start
    return {
        "setting": args.one,
        "model": args.model,
        "params_m": round(model.num_parameters() / 1e6, 1),
        "rollouts": len(prompts),
        "gen_length": args.gen_length,
        "block_length": args.block_length,
        "views": len(views),
        "scored_tokens": scored,
        "scored_tokens_per_s": round(scored / wall, 1),
        "step_s": round(wall, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="small", help="preset size: nano|micro|tiny|small|base")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    results = run_settings(__file__, sys.argv[1:], args.only)
    if "tracerl" in results and "tracerl/packed" in results:
        ratio = results["tracerl/packed"]["step_s"] and (
            results["tracerl"]["step_s"] / results["tracerl/packed"]["step_s"]
        )
        print(json.dumps({"ratio": "tracerl/packed vs tracerl (per-step views)",
                          "speedup": round(ratio, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
