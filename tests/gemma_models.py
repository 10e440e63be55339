"""Tiny random DiffusionGemma models the DiffusionGemma tests share (never downloaded)."""

from __future__ import annotations

import torch

from unmask.models.diffusion_gemma import DiffusionGemma, gemma_preset
from unmask.models.diffusion_gemma_presets import tiny_diffusion_gemma


def sharpened(model: DiffusionGemma, scale: float) -> DiffusionGemma:
    """Scale the final norm so a random model's distributions are peaked: several positions
    then pass the entropy bound per step, the adaptive stop fires and EOS tokens appear."""
    with torch.no_grad():
        model.model.model.decoder.norm.weight.mul_(scale)
    return model


def char_gemma(canvas_length: int = 8, eos: tuple[int, ...] = (16, 58)) -> DiffusionGemma:
    """``diffusion-gemma-nano`` with the character tokenizer, sharpened, with frequent EOS ids."""
    model = sharpened(gemma_preset("diffusion-gemma-nano", canvas_length=canvas_length), 100.0)
    model.model.generation_config.eos_token_id = list(eos)
    return model


def toy_gemma(
    vocab_size: int = 3, canvas_length: int = 2, seed: int = 1, sharpness: float = 5.0
) -> DiffusionGemma:
    """A vocabulary-3, canvas-2 model small enough to enumerate every trajectory."""
    model = tiny_diffusion_gemma(vocab_size, canvas_length, seed=seed, special_ids=(0, 1, 2))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return sharpened(DiffusionGemma(model, None), sharpness)
