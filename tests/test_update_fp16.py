"""fp16's loss scale under skipped updates, and fp16 refused under FSDP2.

accelerate gives fp16 a loss scaler only on CUDA; here a CPU ``GradScaler`` is put where
accelerate keeps its own, so its real ``backward``, ``clip_grad_norm_`` (which unscales and
records overflows) and prepared optimizer run as they do on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from unmask.train.distributed import Parallel
from unmask.train.sharding import FSDPConfig, resolve_fsdp
from unmask.train.update import UpdateGuard, Updater

INIT_SCALE = 2.0**16  # GradScaler's default: one unit of gradient at this scale overflows fp16


@pytest.fixture(autouse=True)
def _own_accelerator_state() -> Iterator[None]:
    """accelerate keeps one process-wide state, fixed by the first Accelerator (other tests'
    ``mixed_precision: no``): start this file's from scratch and give the others theirs back."""
    saved = dict(AcceleratorState._shared_state)
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()
    AcceleratorState._shared_state.update(saved)


def _fp16_updater(init_scale: float = INIT_SCALE) -> tuple[Updater, nn.Module, Accelerator]:
    torch.manual_seed(0)
    acc = Accelerator(cpu=True, mixed_precision="fp16")
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    acc.native_amp = True  # what accelerate sets with a CUDA scaler
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = acc.prepare(model, optimizer)
    parallel = Parallel(acc, FSDPConfig())
    updater = Updater(acc, parallel, model, optimizer, UpdateGuard(acc, limit=3), None)
    return updater, model, acc


def _update(updater: Updater, model: nn.Module, step: int) -> bool:
    x = torch.ones(1, 2)
    return updater([x], lambda b: model(b).sum(), lambda: model(x).sum(), step).skipped


def test_an_overflow_backs_the_loss_scale_off_and_training_goes_on() -> None:
    updater, model, acc = _fp16_updater()
    before = model.weight.detach().clone()
    # At the default scale the fp16 gradient overflows: the update is skipped, the weights
    # untouched, and the scale halves, as GradScaler does on an overflow. (It used to stay
    # put, so every update overflowed and the run stopped after max_bad_steps.)
    assert _update(updater, model, 1)
    assert torch.equal(model.weight, before)
    assert acc.scaler.get_scale() == INIT_SCALE / 2
    # At half the scale the gradient fits: the update lands and the run goes on.
    assert not _update(updater, model, 2)
    assert updater.guard.in_a_row == 0
    # d/dw sum(w.x + b) = x = 1: SGD moves each weight by lr, whatever the loss scale was.
    torch.testing.assert_close(model.weight, before - 0.1)


def test_fp16_is_refused_under_fsdp2() -> None:
    with pytest.raises(ValueError, match="fp16 is not supported with FSDP2"):
        resolve_fsdp(FSDPConfig(enabled=True), "fp16")
    assert resolve_fsdp(FSDPConfig(enabled=True), "bf16").enabled
    assert not resolve_fsdp(FSDPConfig(), "fp16").enabled
