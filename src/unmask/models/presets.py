"""Tiny model presets for CPU work and tests, in both attention layouts.

A preset name is ``SIZE-LAYOUT`` (``tiny-block``, ``base-full``, ...). Every preset is a native
``Qwen3ForCausalLM`` with the character tokenizer of :mod:`unmask.models.tokenizer`, tied
embeddings and weights initialised with std 0.02 (N(0, 1) embeddings hit denormal slow paths
on CPU). This module builds the parts (network, tokenizer, diffusion settings);
:func:`unmask.models.diffusion_lm.from_preset` wraps them, so the wrapper's loader can build a
preset without this module importing the wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM

from unmask.models.tokenizer import build_char_tokenizer


@dataclass(frozen=True)
class Size:
    """The shape of one preset size (hidden width, depth, heads, MLP width)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


SIZES: dict[str, Size] = {
    "nano": Size(hidden=96, layers=3, heads=4, kv_heads=2, intermediate=256),  # ~0.3M
    "micro": Size(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384),  # ~0.8M
    "tiny": Size(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=768),  # ~3.5M
    "small": Size(hidden=384, layers=6, heads=6, kv_heads=6, intermediate=1152),  # ~11M
    "base": Size(hidden=512, layers=12, heads=8, kv_heads=8, intermediate=1536),  # ~41M
}
LAYOUT_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {"layout": "full", "block_size": 32, "block_align": "prompt"},
    "block": {"layout": "block", "block_size": 4, "block_align": "zero"},
}
PRESETS: tuple[str, ...] = tuple(f"{s}-{layout}" for s in SIZES for layout in LAYOUT_DEFAULTS)


def build_preset(
    name: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
    max_positions: int = 2048,
    **settings: Any,
) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerBase, dict[str, Any]]:
    """The randomly initialised network (seeded, same weights each time), its tokenizer and
    its diffusion settings (the layout's defaults, then ``settings``) of a preset name."""
    size_name, _, layout = name.partition("-")
    if size_name not in SIZES or layout not in LAYOUT_DEFAULTS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    size = SIZES[size_name]
    tokenizer = tokenizer if tokenizer is not None else build_char_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.hidden // size.heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        initializer_range=0.02,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    merged = {**LAYOUT_DEFAULTS[layout], "mask_token_id": tokenizer.mask_token_id, **settings}
    return model, tokenizer, merged
