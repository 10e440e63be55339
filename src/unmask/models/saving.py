"""Writing a model folder whole: ``save_pretrained`` into a temporary sibling, a manifest of
sizes and digests (:mod:`unmask.integrity`), then an atomic rename. Trainers write their
``final/`` model and ``unmask convert`` its output through :func:`save_model`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn
from transformers.utils import logging as hf_logging

from unmask.integrity import publish_folder, write_manifest


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
