"""Shared fixtures: tiny models made in the test, never downloaded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny models on 2 cores: one intra-op thread is faster and robust to a busy neighbour core.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def block_model():
    from unmask.models import from_preset

    return from_preset("nano-block", seed=1).eval()


@pytest.fixture(scope="session")
def full_model():
    from unmask.models import from_preset

    return from_preset("nano-full", seed=2).eval()
