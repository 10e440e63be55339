"""Tiny random DiffusionGemma models for CPU work and tests (native classes, no download).

The architecture is the published one at toy sizes: a sliding-window and a full-attention
layer, each with the dense MLP plus the mixture of experts every DiffusionGemma layer has, the
self-conditioning block, tied embeddings, a (minimal) Gemma 4 vision tower the class requires.
``diffusion-gemma-tiny`` uses the character tokenizer of :mod:`unmask.models.tokenizer`;
:func:`tiny_diffusion_gemma` builds any vocabulary and canvas size (vocabulary 3 and canvas 2
for the enumeration tests). This module builds native networks and tokenizers only;
:func:`unmask.models.diffusion_gemma.gemma_preset` wraps them, so the wrapper's loader can
build a preset without this module importing the wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    PreTrainedTokenizerBase,
)

from unmask.models.tokenizer import build_char_tokenizer


@dataclass(frozen=True)
class GemmaSize:
    """The shape of one preset size: width, depth, attention heads, MLP and expert widths."""

    hidden: int
    layers: int
    heads: int
    head_dim: int
    intermediate: int
    experts: int
    top_k: int
    expert_intermediate: int


GEMMA_SIZES: dict[str, GemmaSize] = {
    "nano": GemmaSize(32, 2, 2, 16, 64, 4, 2, 32),  # ~0.05M without the vocabulary
    "tiny": GemmaSize(128, 2, 4, 32, 256, 4, 2, 128),  # ~0.9M
}
GEMMA_PRESETS: tuple[str, ...] = tuple(f"diffusion-gemma-{s}" for s in GEMMA_SIZES)


def tiny_diffusion_gemma(
    vocab_size: int,
    canvas_length: int,
    size: str = "nano",
    seed: int = 0,
    special_ids: tuple[int, int, int] = (0, 1, 2),
    image_id: int | None = None,
    sliding_window: int = 16,
) -> DiffusionGemmaForBlockDiffusion:
    """A seeded random native model; ``special_ids`` are (pad, bos, eos); ``image_id``
    (default: the last id) should be a token prompts never hold."""
    s = GEMMA_SIZES[size]
    pad, bos, eos = special_ids
    text = {
        "vocab_size": vocab_size,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": 1,
        "head_dim": s.head_dim,
        "global_head_dim": s.head_dim,
        "num_experts": s.experts,
        "top_k_experts": s.top_k,
        "moe_intermediate_size": s.expert_intermediate,
        "sliding_window": sliding_window,
        "layer_types": ["sliding_attention"] * (s.layers - 1) + ["full_attention"],
        "max_position_embeddings": 4096,
        "pad_token_id": pad,
        "bos_token_id": bos,
        "eos_token_id": eos,
    }
    vision = {
        "model_type": "gemma4_vision",
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "position_embedding_size": 8,
    }
    image = vocab_size - 1 if image_id is None else image_id
    config = DiffusionGemmaConfig(
        text_config=text, vision_config=vision, canvas_length=canvas_length,
        image_token_id=image, boi_token_id=image, eoi_token_id=image, attn_implementation="sdpa",
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiffusionGemmaForBlockDiffusion(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    return model.eval()


def build_gemma_preset(
    name: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    canvas_length: int = 16,
    seed: int = 0,
) -> tuple[DiffusionGemmaForBlockDiffusion, PreTrainedTokenizerBase]:
    """The seeded native model of ``diffusion-gemma-{nano,tiny}`` and its tokenizer (the
    character tokenizer unless one is given)."""
    size = name.removeprefix("diffusion-gemma-")
    if name not in GEMMA_PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(GEMMA_PRESETS)}")
    tokenizer = tokenizer if tokenizer is not None else build_char_tokenizer()
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = tiny_diffusion_gemma(
        len(tokenizer), canvas_length, size, seed, ids, image_id=tokenizer.mask_token_id
    )
    return model, tokenizer
