"""The diffusion model layer: native transformers classes used as mask predictors."""

from unmask.models.attention import attention_bias, block_index, block_origin
from unmask.models.diffusion_lm import DiffusionLM, DiffusionSettings, from_preset
from unmask.models.presets import PRESETS
from unmask.models.tokenizer import build_char_tokenizer

__all__ = [
    "PRESETS",
    "DiffusionLM",
    "DiffusionSettings",
    "attention_bias",
    "block_index",
    "block_origin",
    "build_char_tokenizer",
    "from_preset",
]
