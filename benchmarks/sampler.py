"""Sampler throughput, NFE per token and peak memory per cache and remasking setting.

Prints one JSON line per setting, then one line per speed-up ratio (measured in the same
run, so the ratios are side by side). Each setting runs in a fresh subprocess so its peak
resident memory is its own.

    python benchmarks/sampler.py                 # ~40M model, batch 16, gen_length 256
    python benchmarks/sampler.py --model nano --gen-length 32 --batch 4   # a quick check

Real vocabularies (issue 21): ``--vocab llada|qwen`` builds a random Qwen3-class model with
LLaDA's (126,464) or Qwen's (151,936) vocabulary and ``--hidden``/``--layers`` small, so the
LM head and softmax dominate as they do at scale. ``--compare-to DIR`` also runs every setting
against the code of another checkout (``git worktree add /tmp/old HEAD``): before and after,
side by side in one run.

    git worktree add --detach /tmp/old21 HEAD
    python benchmarks/sampler.py --vocab llada --hidden 64 --layers 2 --batch 8 \\
        --prompt-length 384 --gen-length 128 --dtype float32 --threads 1 \\
        --only full/none --compare-to /tmp/old21
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any

from _runner import run_settings

SETTINGS = {
    "block/none": ("block", {"cache": "none"}),
    "block/kv": ("block", {"cache": "kv"}),
    "block/kv/threshold": ("block", {"cache": "kv", "remasking": "threshold", "threshold": 0.9}),
    "full/none": ("full", {"cache": "none"}),
    "full/prefix": ("full", {"cache": "prefix"}),
    "full/dual": ("full", {"cache": "dual"}),
    "full/dual/threshold": ("full", {"cache": "dual", "remasking": "threshold", "threshold": 0.9}),
    "block/kv/compiled": ("block", {"cache": "kv", "compile": True}),
    "full/none/compiled": ("full", {"cache": "none", "compile": True}),
}
DEFAULT = [name for name in SETTINGS if not name.endswith("/compiled")]
RATIOS = [
    ("block/kv", "block/none"),
    ("full/prefix", "full/none"),
    ("full/dual", "full/none"),
    ("block/kv/threshold", "block/kv"),
    ("block/kv/compiled", "block/kv"),
    ("full/none/compiled", "full/none"),
]
VOCABS = {"llada": (126_464, 126_336), "qwen": (151_936, 151_666)}  # size, mask id


def build_model(args: argparse.Namespace, layout: str) -> Any:
    """A preset, or a random Qwen3-class model with a real vocabulary and a small width.

    Only APIs that the 'before' checkout also has are used here."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from unmask.models import from_preset
    from unmask.models.diffusion_lm import DiffusionLM, DiffusionSettings
    from unmask.models.presets import LAYOUT_DEFAULTS

    if args.vocab == "chars":
        return from_preset(f"{args.model}-{layout}", block_size=args.block_length)
    vocab, mask_id = VOCABS[args.vocab]
    heads = max(args.hidden // 32, 1)
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=args.hidden // heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        initializer_range=0.02,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    settings = {**LAYOUT_DEFAULTS[layout], "mask_token_id": mask_id}
    settings["block_size"] = args.block_length
    return DiffusionLM(Qwen3ForCausalLM(config), DiffusionSettings(**settings))


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def run_one(args: argparse.Namespace) -> dict:
    import torch

    import unmask
    from unmask.sampling import Sampler, SamplerConfig

    torch.set_num_threads(args.threads)
    layout, extra = SETTINGS[args.one]
    model = build_model(args, layout).eval()
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
    top = 100_000 if args.vocab != "chars" else len(model.tokenizer) - 1  # below any mask id
    prompts = [
        torch.randint(5, top, (args.prompt_length,), generator=gen).tolist()
        for _ in range(args.batch)
    ]
    if extra.get("compile"):  # compile every graph first: the warm-up has the real shapes
        sampler.generate(model, prompts)
    else:
        sampler.generate(model, [p[:8] for p in prompts[:2]])  # warm-up
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before_mb = current_rss_mb()
    start = time.perf_counter()
    out = sampler.generate(model, prompts)
    wall = time.perf_counter() - start
    tokens = int(out.completion_mask.sum())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "setting": args.one,
        "code": unmask.__file__.rsplit("/src/", 1)[0],
        "model": args.model if args.vocab == "chars" else f"{args.vocab}-h{args.hidden}",
        "vocab": model.config.vocab_size,
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
        "peak_rss_mb": round(peak_mb, 1),
        "peak_growth_mb": round(peak_mb - before_mb, 1),  # what the generate call added
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="base", help="preset size: nano|micro|tiny|small|base")
    parser.add_argument("--vocab", default="chars", choices=["chars", *VOCABS])
    parser.add_argument("--hidden", type=int, default=64, help="width with --vocab llada|qwen")
    parser.add_argument("--layers", type=int, default=2, help="layers with --vocab llada|qwen")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps-per-block", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=DEFAULT, choices=list(SETTINGS))
    parser.add_argument("--compare-to", help="a checkout whose src/ is the 'before' code")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    if args.compare_to:
        old = [n for n in args.only if not n.endswith("/compiled")]  # no compile before
        before = run_settings(__file__, sys.argv[1:], old, code=args.compare_to)
        after = run_settings(__file__, sys.argv[1:], args.only)
        for name in old:
            b, a = before[name], after[name]
            print(json.dumps({
                "after vs before": name,
                "speedup": round(a["tokens_per_s"] / b["tokens_per_s"], 2),
                "peak_growth_ratio": round(a["peak_growth_mb"] / max(b["peak_growth_mb"], 1), 3),
            }))  # fmt: skip
    else:
        after = run_settings(__file__, sys.argv[1:], args.only)
    for fast, slow in RATIOS:
        if fast in after and slow in after:
            ratio = after[fast]["tokens_per_s"] / after[slow]["tokens_per_s"]
            print(json.dumps({"ratio": f"{fast} vs {slow}", "speedup": round(ratio, 2)}))


if __name__ == "__main__":
    main()
