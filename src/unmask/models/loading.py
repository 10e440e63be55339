"""One entry point for ``--model``: the right wrapper for a preset, folder or hub name.

Commands and trainers load through :func:`load_model` and then dispatch on the model's
``noise`` capability (``"mask"``: :class:`DiffusionLM`; ``"uniform"``: :class:`DiffusionGemma`),
never on its name. A DiffusionGemma is recognised by a ``diffusion-gemma-*`` preset name or a
config whose ``model_type`` is ``diffusion_gemma``; everything else is a mask predictor (which
also covers the published mask families converted on the fly).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeAlias

import torch

from unmask.models.diffusion_gemma import DiffusionGemma
from unmask.models.diffusion_gemma_presets import GEMMA_PRESETS
from unmask.models.diffusion_lm import DiffusionLM
from unmask.models.presets import PRESETS

DiffusionModel: TypeAlias = DiffusionLM | DiffusionGemma
GEMMA_MODEL_TYPE = "diffusion_gemma"


def load_model(
    name_or_path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    quantization_config: Any = None,
    **settings: Any,
) -> DiffusionModel:
    """:meth:`DiffusionGemma.from_pretrained` for a DiffusionGemma, else
    :meth:`DiffusionLM.from_pretrained` (``settings``: its diffusion-setting overrides)."""
    if not is_diffusion_gemma(name_or_path):
        return DiffusionLM.from_pretrained(
            name_or_path, dtype, device, quantization_config=quantization_config, **settings
        )
    if quantization_config is not None or settings:
        raise ValueError(
            f"{name_or_path}: a DiffusionGemma loads without diffusion settings or 4-bit "
            f"quantization (got {sorted(settings) or 'quantization_config'})"
        )
    return DiffusionGemma.from_pretrained(name_or_path, dtype, device)


def is_diffusion_gemma(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` names a DiffusionGemma (a preset, or its ``config.json``'s
    ``model_type``). A name whose config cannot be read is left to :class:`DiffusionLM`, whose
    loading errors say what is wrong."""
    name = str(name_or_path)
    path = Path(name)
    if not path.exists() and (name in GEMMA_PRESETS or name in PRESETS):
        return name in GEMMA_PRESETS
    if path.exists():
        config = path / "config.json"
        if not config.is_file():
            return False
        return json.loads(config.read_text()).get("model_type") == GEMMA_MODEL_TYPE
    from transformers import PretrainedConfig

    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name)
    except OSError:
        return False
    return config_dict.get("model_type") == GEMMA_MODEL_TYPE
