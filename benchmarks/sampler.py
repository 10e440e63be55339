"""Sampler throughput, NFE per token and peak memory per cache and remasking setting.

Prints one JSON line per setting, then one line per speed-up ratio (measured in the same
run, so the ratios are side by side). Each setting runs in a fresh subprocess so its peak
resident memory is its own.

    python benchmarks/sampler.py                 # ~40M model, batch 16, gen_length 256
    python benchmarks/sampler.py --model nano --gen-length 32 --batch 4   # a quick check
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from _runner import run_settings

SETTINGS = {
    "block/none": ("block", {"cache": "none"}),
    "block/kv": ("block", {"cache": "kv"}),
    "block/kv/threshold": ("block", {"cache": "kv", "remasking": "threshold", "threshold": 0.9}),
    "full/none": ("full", {"cache": "none"}),
    "full/prefix": ("full", {"cache": "prefix"}),
    "full/dual": ("full", {"cache": "dual"}),
    "full/dual/threshold": ("full", {"cache": "dual", "remasking": "threshold", "threshold": 0.9}),
}
RATIOS = [
    ("block/kv", "block/none"),
    ("full/prefix", "full/none"),
    ("full/dual", "full/none"),
    ("block/kv/threshold", "block/kv"),
]


def run_one(args: argparse.Namespace) -> dict:
    import torch

    from unmask.models import from_preset
    from unmask.sampling import Sampler, SamplerConfig

    torch.set_num_threads(args.threads)
    layout, extra = SETTINGS[args.one]
    model = from_preset(f"{args.model}-{layout}", block_size=args.block_length).eval()
    model.to(getattr(torch, args.dtype))
    config = SamplerConfig(
        gen_length=args.gen_length,
        block_length=args.block_length,
        steps_per_block=args.steps_per_block,
        stop_at_eos=False,  # an untrained model: measure the full length every time
        **extra,
    )
    sampler = Sampler(config)
    gen = torch.Generator().manual_seed(0)
    vocab = len(model.tokenizer)
    prompts = [
        torch.randint(5, vocab - 1, (args.prompt_length,), generator=gen).tolist()
        for _ in range(args.batch)
    ]
    sampler.generate(model, [p[:8] for p in prompts[:2]])  # warm-up
    start = time.perf_counter()
    out = sampler.generate(model, prompts)
    wall = time.perf_counter() - start
    tokens = int(out.completion_mask.sum())
    return {
        "setting": args.one,
        "model": args.model,
        "params_m": round(model.num_parameters() / 1e6, 1),
        "dtype": args.dtype,
        "batch": args.batch,
        "prompt_length": args.prompt_length,
        "gen_length": args.gen_length,
        "block_length": args.block_length,
        "steps_per_block": args.steps_per_block,
        "tokens_per_s": round(tokens / wall, 1),
        "nfe": out.nfe,
        "nfe_per_token": round(out.nfe / args.gen_length, 4),
        "mean_tokens_per_step": round(float(out.tokens_per_step().mean()), 2),
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="base", help="preset size: nano|micro|tiny|small|base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps-per-block", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    results = run_settings(__file__, sys.argv[1:], args.only)
    for fast, slow in RATIOS:
        if fast in results and slow in results:
            ratio = results[fast]["tokens_per_s"] / results[slow]["tokens_per_s"]
            print(json.dumps({"ratio": f"{fast} vs {slow}", "speedup": round(ratio, 2)}))


if __name__ == "__main__":
    main()
