"""Writing model folders. :func:`save_folder` is every wrapper's ``save_pretrained``: the
Hugging Face layout, or the LoRA layout when adapters are attached. :func:`save_model` writes a
folder whole: ``save_pretrained`` into a temporary sibling, a manifest of sizes and digests
(:mod:`unmask.integrity`), then an atomic rename; trainers write their ``final/`` model and
``unmask convert`` its output through it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn
from transformers.utils import logging as hf_logging

from unmask.integrity import publish_folder, write_manifest
from unmask.models.lora import save_lora


def save_folder(wrapper: nn.Module, path: str | Path, **kwargs: Any) -> None:
    """Save a wrapper's transformers model (``wrapper.model``) and tokenizer in the Hugging
    Face layout, or in the LoRA layout of :mod:`unmask.models.lora` when adapters are attached
    (so trainers resume them); shared by every model wrapper."""
    if getattr(wrapper.model, "peft_config", None) is not None:
        save_lora(wrapper, Path(path))  # type: ignore[arg-type]
    else:
        wrapper.model.save_pretrained(str(path), **kwargs)
    if wrapper.tokenizer is not None:
        wrapper.tokenizer.save_pretrained(str(path))


def save_model(model: nn.Module, path: str | Path) -> Path:
    """``save_pretrained`` into ``path`` atomically (temporary sibling, fsync, rename), with a
    manifest of sizes and SHA-256 digests so that loading it can detect corruption."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained_quietly(model, tmp)
    write_manifest(tmp)
    publish_folder(tmp, path)
    return path


def save_pretrained_quietly(model: nn.Module, path: Path) -> None:
    """``model.save_pretrained`` without transformers' per-save progress bar (it would break
    the trainer's own bar every checkpoint)."""
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)  # type: ignore[operator]
    finally:
        if shown:
            hf_logging.enable_progress_bar()
