"""GPU check (issue 21): rollouts and RL steps at real model sizes, with random weights.

Builds LLaDA-8B and SDAR-4B/TraDo-4B from their published configs (no hub access: random
weights, bf16) and prints one JSON line per measurement: the sampler's tokens/s and peak
memory for block 4 and 32, batch 1/32/128, each cache mode, eager and compiled; then one
TraceRL and one AGRPO optimizer step. The published anchors are printed first, beside ours.
Lines are printed as they finish, so a run stopped early still reports what it measured.

    python benchmarks/gpu/rollouts.py            # one H100/H200: under 8 minutes
    python benchmarks/gpu/rollouts.py --toy      # CPU, tiny widths, eager only: what CI runs

Record the figures in benchmarks/RESULTS.md with the GPU named (``nvidia-smi -L``).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from unmask.models.diffusion_lm import DiffusionLM, DiffusionSettings
from unmask.objectives import (
    ClipConfig,
    LossInputs,
    get_objective,
    normalizers,
    policy_loss,
    token_logprobs,
)
from unmask.sampling import Sampler, SamplerConfig

ANCHORS = [
    "JetEngine (dLLM-RL): SDAR-4B, block 4, batch 128: 3,700+ tok/s on an H200, 1,800+ on an A800",
    "Fast-dLLM: LLaDA-8B prefix/dual caches 8-11x over no cache at generation length 256-512",
    "d1: diffu-GRPO on LLaDA-8B about 2 days on 8xA100",
]


@dataclass(frozen=True)
class Arch:
    """A published architecture: its config, and how it runs as a diffusion model."""

    config: Any
    layout: str
    block_align: str
    mask_token_id: int
    caches: tuple[str, ...]


def archs(toy: bool) -> dict[str, Arch]:
    """LLaDA-8B (Llama class, full attention) and SDAR-4B/TraDo-4B (Qwen3-4B, block-causal).
    ``toy`` keeps the vocabularies and shrinks widths and depths to run on a CPU."""
    w = (lambda real, small: small) if toy else (lambda real, small: real)
    llada = LlamaConfig(
        vocab_size=126_464, hidden_size=w(4096, 64), intermediate_size=w(12_288, 192),
        num_hidden_layers=w(32, 2), num_attention_heads=w(32, 2), num_key_value_heads=w(32, 2),
        max_position_embeddings=4096, rope_theta=500_000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    sdar = Qwen3Config(
        vocab_size=151_936, hidden_size=w(2560, 64), intermediate_size=w(9728, 192),
        num_hidden_layers=w(36, 2), num_attention_heads=w(32, 2), num_key_value_heads=w(8, 1),
        head_dim=w(128, 32), max_position_embeddings=w(40_960, 4096), rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, attn_implementation="sdpa",
    )  # fmt: skip
    return {
        "llada-8b": Arch(llada, "full", "prompt", 126_336, ("none", "prefix", "dual")),
        "sdar-4b": Arch(sdar, "block", "zero", 151_669, ("none", "kv")),
    }


def build(arch: Arch, block: int, device: torch.device, dtype: torch.dtype) -> DiffusionLM:
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(arch.config, dtype=dtype)
    settings = DiffusionSettings(
        mask_token_id=arch.mask_token_id, layout=arch.layout, block_size=block,  # type: ignore[arg-type]
        block_align=arch.block_align,  # type: ignore[arg-type]
    )  # fmt: skip
    return DiffusionLM(model, settings)


class Peak:
    """Peak memory of what runs inside: CUDA allocator peak, else resident-set growth."""

    def __enter__(self) -> Peak:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start_rss = _rss_mb()
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.start_rss


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 100_000, (length,), generator=gen).tolist() for _ in range(batch)]


def sample_row(model: DiffusionLM, name: str, cache: str, compiled: bool, batch: int,
               args: argparse.Namespace) -> dict:  # fmt: skip
    config = SamplerConfig(
        gen_length=args.gen_length, block_length=model.block_size, cache=cache,
        stop_at_eos=False, compile=compiled,
    )  # fmt: skip
    sampler = Sampler(config)
    batch_prompts = prompts(batch, args.prompt_length)
    sampler.generate(model, batch_prompts if compiled else batch_prompts[:1])  # warm-up/compile
    with Peak() as peak:
        start = time.perf_counter()
        out = sampler.generate(model, batch_prompts)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    return {
        "check": "sample", "model": name, "block": model.block_size, "batch": batch,
        "cache": cache, "compiled": compiled, "nfe": out.nfe,
        "tokens_per_s": round(int(out.completion_mask.sum()) / wall, 1),
        "wall_s": round(wall, 2), "peak_mb": round(peak.mb, 1),
    }  # fmt: skip


def train_row(model: DiffusionLM, name: str, objective_name: str, args: argparse.Namespace) -> dict:
    """One optimizer step of ``objective_name`` on a fresh rollout batch."""
    sampler = Sampler(SamplerConfig(
        gen_length=args.gen_length, block_length=model.block_size, temperature=1.0,
        stop_at_eos=False, return_logprobs=True,
    ))  # fmt: skip
    rollout = sampler.generate(model.eval(), prompts(args.train_batch, args.prompt_length))
    objective = get_objective(objective_name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    advantages = torch.randn(rollout.batch_size, generator=torch.Generator().manual_seed(0))
    divisors = normalizers(rollout, objective.loss_type)
    kw = {"temperature": 1.0} if objective.scores_sampling_distribution else {}
    model.train()
    with Peak() as peak:
        start = time.perf_counter()
        views = objective.views(rollout, torch.Generator().manual_seed(1))
        sampled = views.per_token(rollout.logprobs)
        for first in range(0, len(views), args.micro_batch):
            chunk = views.select(slice(first, first + args.micro_batch))
            logp = token_logprobs(model, chunk, len(chunk), **kw)
            old = logp.detach() if objective.old_logprobs == "recompute" else sampled[
                first : first + args.micro_batch].to(logp.device)  # fmt: skip
            inputs = LossInputs(
                logp, old, advantages.to(logp.device), chunk.scored.to(logp.device),
                chunk.weights.to(logp.device), chunk.rollout_index.to(logp.device),
                divisors.to(logp.device), lengths=rollout.completion_lengths.to(logp.device),
            )  # fmt: skip
            clip = ClipConfig(level=objective.importance_sampling_level)
            policy_loss(inputs, clip).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    model.eval()
    del optimizer
    return {
        "check": "train_step", "model": name, "objective": objective_name,
        "block": model.block_size, "rollouts": rollout.batch_size, "views": len(views),
        "scored_tokens": int(views.scored.sum()), "step_s": round(wall, 2),
        "peak_mb": round(peak.mb, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--toy", action="store_true", help="tiny widths on CPU (CI)")
    parser.add_argument("--models", nargs="*", default=["sdar-4b", "llada-8b"])
    parser.add_argument("--blocks", nargs="*", type=int, default=[4, 32])
    parser.add_argument("--batches", nargs="*", type=int, default=None)
    parser.add_argument("--prompt-length", type=int, default=None)
    parser.add_argument("--gen-length", type=int, default=None)
    parser.add_argument("--train-batch", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip rows after this")
    args = parser.parse_args()
    toy = args.toy or not torch.cuda.is_available()
    args.batches = args.batches or ([1, 2] if toy else [1, 32, 128])
    args.prompt_length = args.prompt_length or (8 if toy else 64)
    args.gen_length = args.gen_length or (32 if toy else 64)
    args.train_batch = args.train_batch or (2 if toy else 16)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "toy": toy, "anchors": ANCHORS}), flush=True)
    start = time.perf_counter()

    def skipped(what: dict) -> bool:
        """Past the time budget: say which row is skipped."""
        if time.perf_counter() - start <= args.budget_s:
            return False
        print(json.dumps({**what, "skipped": f"past --budget-s {args.budget_s}"}), flush=True)
        return True

    for model_name in args.models:
        arch = archs(toy)[model_name]
        model = build(arch, args.blocks[0], device, dtype).eval()
        print(json.dumps({"model": model_name, "params_b": round(model.num_parameters() / 1e9, 3)}),
              flush=True)  # fmt: skip
        for objective_name in ("tracerl", "agrpo"):
            what = {"check": "train_step", "model": model_name, "objective": objective_name}
            if not skipped(what):
                print(json.dumps(train_row(model, model_name, objective_name, args)), flush=True)
        for block in args.blocks:
            model.set_block_size(block)
            for batch in args.batches:
                for cache in arch.caches:
                    compiled_too = cache in ("none", "kv") and not toy  # CPU compiles: minutes
                    for compiled in (False, True) if compiled_too else (False,):
                        what = {"check": "sample", "model": model_name, "block": block,
                                "batch": batch, "cache": cache, "compiled": compiled}  # fmt: skip
                        if not skipped(what):
                            row = sample_row(model, model_name, cache, compiled, batch, args)
                            print(json.dumps(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
