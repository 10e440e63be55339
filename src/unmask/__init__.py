"""unmask: reinforcement-learning post-training for masked diffusion language models.

Top-level names are imported lazily so that ``import unmask`` (and the CLI's argument parsing)
does not pay for torch and transformers until a model is needed.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["DiffusionLM", "DiffusionSettings", "Sampler", "SamplerConfig", "from_preset"]

_LAZY = {
    "DiffusionLM": "unmask.models",
    "DiffusionSettings": "unmask.models",
    "from_preset": "unmask.models",
    "Sampler": "unmask.sampling",
    "SamplerConfig": "unmask.sampling",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unmask' has no attribute {name!r}")
