"""Atomic, resumable checkpoints in the Hugging Face layout (shared by the SFT and RL trainers).

A checkpoint is ``RUN_DIR/checkpoints/step-00000100/``: the model folder that
``save_pretrained`` writes (config, safetensors, tokenizer: loadable with
``DiffusionLM.from_pretrained``; a sharded model is gathered whole first), plus
``optimizer/``, ``scheduler.pt``, ``rng_state.pt`` (python, numpy, torch and named generators,
one entry per rank), ``trainer_state.json`` (the step and the trainer's own state, e.g. the data
position and the metrics window) and, written last, ``checkpoint.json``: the manifest of every
file with its size and SHA-256 (:mod:`unmask.integrity`: the files written here are hashed while
written, the others right after, while page-cache hot).

``optimizer/`` is a ``torch.distributed.checkpoint`` (DCP) folder (``.metadata`` and one
``__RANK_0.distcp`` per process that wrote), always, also on one process and under DDP: the
optimizer state keyed by parameter names (FQNs), each process writing its own shards under
FSDP2 (nothing is gathered) and one copy of replicated entries. One format for every set-up
is the simplest design that resumes across world sizes: DCP records each tensor's global shape
and which chunk each file holds, so loading reads the chunks this process's (sharded or whole)
tensors cover, and a checkpoint written by 2 FSDP2 processes resumes on 1 process, under DDP
or on 4, and the reverse, with no conversion step. The manifest covers those files too: they
are hashed by the main process once all processes have written them (they must share
``RUN_DIR``'s file system, as the model folder does), and every process verifies them all
before loading.

Saving writes into a hidden temporary folder next to the final one (its name chosen by the
main process and sent to the others), fsyncs every file and the folder, then renames it into
place: a crash leaves the previous checkpoints untouched and at most a ``.tmp-*`` folder, which
the next save removes. Loading checks the manifest first, so a partial, truncated or corrupted
folder is refused, naming the folder and the file, before anything is changed.
:func:`unmask.models.saving.save_model` writes the same manifest into a model folder (a
trainer's ``final/``), so loading it can be verified too.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

# CheckpointError lives with the manifests so models can raise it; it is re-exported here.
from unmask.integrity import (
    CheckpointError,
    publish_folder,
    verify_manifest,
    write_hashed,
    write_manifest,
)
from unmask.models.saving import save_pretrained_quietly

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer"  # a DCP folder (module docstring)
SCHEDULER = "scheduler.pt"
RNG_STATE = "rng_state.pt"


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """This process's random states: python, numpy, torch (CPU and CUDA), named generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Inverse of :func:`capture_rng_state`; every named generator must be in the state."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, generator in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointError(f"the checkpoint has no state for generator {name!r}")
        generator.set_state(state["generators"][name])


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Finished checkpoint folders of a run, oldest first (temporary folders excluded)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=lambda p: _step_of(p) or 0)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint folder of a run (not validated: :func:`load_checkpoint` does)."""
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    extra_state: Mapping[str, Any] | None = None,
    rng_states: Sequence[Mapping[str, Any]] | None = None,
    keep_last: int | None = None,
    trained: nn.Module | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep_last`` ones.

    Every process calls it when the run is distributed (it is a collective): each writes its
    part of the optimizer state (:func:`save_sharded`), the main process the rest. ``model``
    needs ``save_pretrained`` (a ``DiffusionLM`` or a transformers model, unwrapped, whole; it
    is read on the main process only, so may be None elsewhere). ``trained`` is the module
    the optimizer's parameters belong to (DDP-wrapped or FSDP2-sharded), default ``model``.
    ``extra_state`` must be JSON-serialisable. ``rng_states`` holds one
    :func:`capture_rng_state` per rank (default: this process only). ``write_extra(folder)``
    runs on every process after the optimizer is written, to add files of the caller's own
    (e.g. with :func:`save_sharded`), listed in the manifest like the rest. Returns the
    folder once it is in place, on every process.
    """
    extra = dict(extra_state or {})
    if "step" in extra:
        raise ValueError("extra_state must not have a 'step' key: the step is stored already")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"{PREFIX}{step:08d}"
    main = not _distributed() or dist.get_rank() == 0
    tmp = None
    if main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        (tmp / OPTIMIZER).mkdir(parents=True)
    tmp = _from_main(tmp)  # one folder for all processes (their pids differ)
    save_sharded(trained if trained is not None else model, optimizer, tmp / OPTIMIZER)
    if write_extra is not None:
        write_extra(tmp)
    if main:
        assert model is not None, "the main process saves the model"
        save_pretrained_quietly(model, tmp)
        digests = {}
        if scheduler is not None:
            digests[SCHEDULER] = _torch_save(scheduler.state_dict(), tmp / SCHEDULER)
        rng = list(rng_states or [capture_rng_state()])
        digests[RNG_STATE] = _torch_save(rng, tmp / RNG_STATE)
        state = (json.dumps({"step": step, **extra}, indent=2) + "\n").encode()
        digests[TRAINER_STATE] = write_hashed(tmp / TRAINER_STATE, lambda f: f.write(state))
        write_manifest(tmp, digests, step=step)  # hashes the model's and optimizer's files
        publish_folder(tmp, final)
        if keep_last is not None:
            for old in checkpoint_dirs(run_dir)[:-keep_last]:
                shutil.rmtree(old)
    if _distributed():
        dist.barrier()
    return final


def load_checkpoint(
    path: str | Path,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    rank: int = 0,
    trained: nn.Module | None = None,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG states from ``path``.

    ``model`` None: the weights are left to the caller (a sharded model, which
    :class:`unmask.train.distributed.Parallel` loads). ``trained`` is the module the
    optimizer's parameters belong to (default ``model``); with an ``optimizer``, every process
    of a distributed run calls this (loading it is a collective). A rank the checkpoint has no
    random state for (resuming on more processes than saved) keeps its freshly seeded streams.
    Returns the trainer state: ``{"step": ..., **extra_state}``.
    The folder is verified against its manifest first (sizes and SHA-256 digests:
    :func:`unmask.integrity.verify_manifest`), so nothing is changed when it is incomplete or
    corrupted. ``rng_state.pt`` is unpickled: load only checkpoints you wrote.
    """
    path = Path(path)
    manifest = verify_manifest(path)
    if model is not None:
        load_model_weights(model, path)
    if optimizer is not None:
        module = trained if trained is not None else model
        if module is None:
            raise ValueError("loading an optimizer needs the module its parameters belong to")
        load_sharded(module, optimizer, path / OPTIMIZER)
    if scheduler is not None:
        if SCHEDULER not in manifest["files"]:
            raise CheckpointError(f"checkpoint {path} has no {SCHEDULER}")
        scheduler.load_state_dict(torch.load(path / SCHEDULER, weights_only=True))
    states = torch.load(path / RNG_STATE, weights_only=False)
    if rank < len(states):
        restore_rng_state(states[rank], generators)
    else:  # resuming on more processes than saved: the new ranks keep their fresh seeds
        logger.warning(
            "checkpoint %s holds random states for %d process(es); rank %d starts from its "
            "seed instead", path, len(states), rank,
        )  # fmt: skip
    return json.loads((path / TRAINER_STATE).read_text())


def save_sharded(
    module: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, weights: bool = False
) -> None:
    """Write ``optimizer``'s state (with ``weights``, ``module``'s parameters too), keyed by
    the parameter names of ``module`` (plain, DDP-wrapped or FSDP2-sharded), into the DCP
    folder ``folder``: each process its own shards, nothing gathered (collective when
    distributed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(module, _unwrapped(optimizer))
    state = {"optimizer": optimizer_state, **({"model": model_state} if weights else {})}
    with _single_process_quietly():
        dcp.save(state, checkpoint_id=folder, no_dist=not _distributed())


def load_sharded(
    module: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, weights: bool = False
) -> None:
    """Load what :func:`save_sharded` wrote, on any number of processes, into ``module``'s
    ``optimizer`` (with ``weights``, its parameters too), sharded or not: DCP reads the chunks
    each process's tensors cover."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if not (folder / ".metadata").is_file():
        raise CheckpointError(
            f"{folder.parent} has no {folder.name}/.metadata: not a checkpoint of this version "
            "(optimizer states are stored with torch.distributed.checkpoint)"
        )
    inner = _unwrapped(optimizer)
    # The current state (the optimizer's initialised if need be) gives DCP the shapes and
    # shards to fill; the loaded values then replace it. Parameters the saved optimizer held no
    # state for (never given a gradient, e.g. a frozen tower) are left out, as they were.
    model_state, optimizer_state = get_state_dict(module, inner)
    saved = set(dcp.FileSystemReader(folder).read_metadata().state_dict_metadata)
    optimizer_state["state"] = {
        name: entries
        for name, entries in optimizer_state["state"].items()
        if all(f"optimizer.state.{name}.{key}" in saved for key in entries)
    }
    state = {"optimizer": optimizer_state, **({"model": model_state} if weights else {})}
    with _single_process_quietly():
        dcp.load(state, checkpoint_id=folder, no_dist=not _distributed())
    if weights:
        set_model_state_dict(module, model_state)
    # Not strict: the parameters left out above keep no state, as when it was saved.
    set_optimizer_state_dict(module, inner, optimizer_state, options=StateDictOptions(strict=False))


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Copy the safetensors weights of an HF model folder into ``model`` in place.

    The folder's keys are those of the module whose ``save_pretrained`` wrote it: ``model``
    itself or its ``.model`` (a ``DiffusionLM`` wraps a transformers model). Keys missing from
    the file are accepted only for tied weights (e.g. ``lm_head`` tied to the embeddings).
    """
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except SafetensorError as err:
            message = f"{file}: truncated or corrupted safetensors file ({err})"
            raise CheckpointError(message) from err
    inner = getattr(model, "model", None)
    for target in (model, inner):
        if not isinstance(target, nn.Module):
            continue
        own = target.state_dict()
        if not set(state) <= set(own):
            continue
        loaded = {own[k].data_ptr() for k in state}
        untied = [k for k in set(own) - set(state) if own[k].data_ptr() not in loaded]
        if untied:
            raise CheckpointError(f"{path} lacks weights for {sorted(untied)[:5]}")
        target.load_state_dict(state, strict=False)
        return
    extra = sorted(set(state) - set(model.state_dict()))[:5]
    raise CheckpointError(f"the weights in {path} do not fit the model (unexpected keys {extra})")


def _torch_save(obj: Any, path: Path) -> str:
    """``torch.save`` hashing the bytes as they are written; returns their SHA-256."""
    return write_hashed(path, lambda f: torch.save(obj, f))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _from_main(value: Any) -> Any:
    """The main process's ``value``, on every process."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _unwrapped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or itself)."""
    return getattr(optimizer, "optimizer", optimizer)


@contextmanager
def _single_process_quietly() -> Iterator[None]:
    """DCP warns on every single-process save and load that it assumes one process: it does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _step_of(path: Path) -> int | None:
    suffix = path.name.removeprefix(PREFIX)
    return int(suffix) if path.name.startswith(PREFIX) and suffix.isdigit() else None
