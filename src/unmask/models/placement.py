"""Where a model is loaded and in which dtype: the ``"auto"`` rules every loader shares (the
mask predictor, DiffusionGemma, the value model), so that one ``--device``/``--dtype`` means
the same thing whichever model a command loads; and :class:`Placed`, what every model wrapper
says about where its weights are."""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 elsewhere (CPU bf16 is slow); a name from
    :data:`DTYPES` or a ``torch.dtype`` is taken as it is."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class Placed(nn.Module):
    """A module that reports where its weights are: the base of every model wrapper, so the
    sampler and trainers ask any of them the same way."""

    @property
    def device(self) -> torch.device:
        """Where the weights are (the sampler puts its tensors there)."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (additive attention masks are built in it)."""
        return next(self.parameters()).dtype

    def num_parameters(self) -> int:
        """Every parameter counted (adapters included), for logs and reports."""
        return sum(p.numel() for p in self.parameters())
