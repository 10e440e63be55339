"""unmask: reinforcement-learning post-training for masked diffusion language models."""

from unmask.models import DiffusionLM, DiffusionSettings, from_preset

__version__ = "0.1.0"
__all__ = ["DiffusionLM", "DiffusionSettings", "__version__", "from_preset"]
