"""``unmask convert``: write a checkpoint once as a native folder, so later loads are plain
``from_pretrained`` calls.

A published family's checkpoint (:mod:`unmask.models.convert`) is written in the native layout
with its diffusion settings in ``config.json``; a LoRA folder (:mod:`unmask.models.lora`) is
merged into a plain native model. It sits above :class:`~unmask.models.diffusion_lm.DiffusionLM`
because it loads and saves through it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from unmask.models.convert import CONFIG, find_family_checkpoint, load_family, read_config
from unmask.models.diffusion_lm import DiffusionLM, DiffusionSettings
from unmask.models.families import FAMILIES
from unmask.models.lora import merge_lora
from unmask.models.placement import DTYPES
from unmask.models.saving import save_model

KEEP_FILES = ("README.md", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE")


def convert_checkpoint(
    source: str | Path, destination: str | Path, dtype: str | None = None, **overrides: Any
) -> Path:
    """Write the family checkpoint ``source`` (folder or hub name) natively to ``destination``;
    a LoRA folder (``unmask.models.lora``) is merged into a native model instead.

    ``dtype`` (``float32``, ``bfloat16``, ``float16``) casts the weights; by default every tensor
    keeps its stored dtype. ``overrides`` replace diffusion settings. Returns ``destination``.
    """
    dst = Path(destination)
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"{dst} exists and is not empty: choose a new destination folder")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or unset), got {dtype!r}")
    if (Path(source) / CONFIG).is_file() and "lora" in read_config(Path(source) / CONFIG):
        return _merge_lora_folder(Path(source), dst, dtype)
    found = find_family_checkpoint(source)
    if found is None:
        raise ValueError(_not_a_family(source))
    family, config, folder = found
    torch_dtype = DTYPES[dtype] if dtype is not None else None
    model, tokenizer, settings = load_family(family, config, folder, torch_dtype, **overrides)
    save_model(DiffusionLM(model, DiffusionSettings.from_dict(settings), tokenizer), dst)
    for name in KEEP_FILES:  # the model card and licence travel with the weights
        if (folder / name).is_file():
            shutil.copyfile(folder / name, dst / name)
    return dst


def _merge_lora_folder(source: Path, dst: Path, dtype: str | None) -> Path:
    """A LoRA folder (``unmask.models.lora``) merged into a native model: the adapters are
    folded in fp32, the result saved in ``dtype`` or the base's stored dtype."""
    config = read_config(source / CONFIG)
    stored = dtype or config.get("dtype") or config.get("torch_dtype") or "float32"
    model = merge_lora(DiffusionLM.from_pretrained(source, dtype="float32", device="cpu"))
    return save_model(model.to(getattr(torch, stored)), dst)


def _not_a_family(source: str | Path) -> str:
    types = sorted({t for f in FAMILIES.values() for t in f.model_types})
    return (
        f"{source} is not a checkpoint of a published dLLM family (a folder or hub name whose "
        f"config.json has model_type in {types}); native Llama/Qwen2/Qwen3 checkpoints and "
        "unmask's own folders load as they are"
    )
