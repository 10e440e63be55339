"""Manifests that make a saved folder tamper-evident: every file's size and SHA-256.

A checkpoint, a trainer's ``final/`` model or a converted model folder ends with
``checkpoint.json``: ``{"files": {name: bytes}, "sha256": {name: hex digest}, ...}`` over every
file below the folder (names are POSIX paths relative to it). Sizes catch a truncated copy;
digests catch what sizes cannot, a same-size bit flip or a zeroed block, which would otherwise
load and train or generate garbage.

Digests are taken without a second pass over the bytes where the writer is ours: files
written through :func:`write_hashed` (``torch.save`` of the optimizer, scheduler and random
states, the trainer's JSON) are hashed as their bytes pass. Files that other code writes by
path (``save_pretrained``: config, safetensors, tokenizer; the value model's state) are
hashed by :func:`write_manifest` right after, one read while they are still in the page
cache. Nothing is read twice.

:func:`verify_manifest` (a checkpoint to resume: the manifest is required) and
:func:`verify_model_folder` (a model folder to load: checked when it has a manifest) check
sizes first (cheap), then digests. ``UNMASK_VERIFY_CHECKSUMS=0`` skips the digests (sizes are
still checked) for folders too large to re-read at every load: SHA-256 runs at about 1.7 GB/s
on one core. A manifest written before digests existed (no ``sha256`` key) is checked by size
only. Standard library only, so every layer (models included) can use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from unmask.errors import UserError

MANIFEST = "checkpoint.json"
VERIFY_ENV = "UNMASK_VERIFY_CHECKSUMS"
_OFF = ("0", "false", "no", "off")


class CheckpointError(UserError, ValueError):
    """A saved folder that is missing, partial, corrupted, or does not fit the model."""


class HashingWriter:
    """A write-only binary file that hashes what passes through it (``torch.save`` accepts
    it like any file object)."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._sha256 = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` through, hashing it on the way."""
        self._sha256.update(data)
        return self._file.write(data)

    def flush(self) -> None:
        """Flush the underlying file."""
        self._file.flush()

    def hexdigest(self) -> str:
        """SHA-256 of everything written so far."""
        return self._sha256.hexdigest()


def write_hashed(path: Path, write: Callable[[HashingWriter], object]) -> str:
    """Create ``path`` with ``write(file)``; the SHA-256 of the bytes written, taken as they
    pass (nothing is read back)."""
    with open(path, "wb") as raw:
        file = HashingWriter(raw)
        write(file)
    return file.hexdigest()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read once in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(
    folder: Path, digests: Mapping[str, str] | None = None, **fields: Any
) -> dict[str, Any]:
    """List every file under ``folder`` with its size and SHA-256 in ``checkpoint.json``.

    ``digests`` holds those taken while writing (:func:`write_hashed`); the other files are
    hashed now. ``fields`` (e.g. the step) are stored alongside. Call it last: a file written
    after it is not listed.
    """
    digests = dict(digests or {})
    names = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST
    )
    manifest = {
        **fields,
        "files": {name: (folder / name).stat().st_size for name in names},
        "sha256": {name: digests.get(name) or file_sha256(folder / name) for name in names},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_manifest(folder: str | Path) -> dict[str, Any]:
    """Check a checkpoint ``folder`` against its manifest: every listed file present, of the
    listed size and, unless ``UNMASK_VERIFY_CHECKSUMS=0``, of the listed SHA-256.

    Returns the manifest; any mismatch, or no manifest, is a :class:`CheckpointError` naming
    the folder and the file.
    """
    return _verify(Path(folder), model_folder=False)


def verify_model_folder(folder: str | Path) -> None:
    """Verify a model folder before loading it, when it has a manifest (the trainers'
    checkpoints and ``final/``, ``unmask convert``'s output); a folder without one (a hub
    download, other tools' output) is accepted as it is."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        _verify(folder, model_folder=True)


def checksums_enabled() -> bool:
    """False when ``UNMASK_VERIFY_CHECKSUMS`` is 0/false/no/off."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in _OFF


def _verify(folder: Path, model_folder: bool) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint folder {folder} does not exist")
        raise CheckpointError(
            f"checkpoint {folder} is incomplete: {MANIFEST} is missing (an interrupted save?)"
        )
    manifest = _read_manifest(path)
    for name, size in manifest["files"].items():
        _check_size(folder, name, size)
    if checksums_enabled():
        for name in manifest["files"]:
            _check_digest(folder, name, manifest["sha256"].get(name), model_folder)
    return manifest


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
        manifest["files"] = {str(k): int(v) for k, v in dict(manifest["files"]).items()}
        manifest["sha256"] = {str(k): str(v) for k, v in dict(manifest.get("sha256", {})).items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path.parent}: {MANIFEST} is unreadable ({err})"
        ) from err
    return manifest


def _check_digest(folder: Path, name: str, digest: str | None, model_folder: bool) -> None:
    if digest is None or file_sha256(folder / name) == digest:
        return
    # Deleting the manifest lets a model folder load (it is optional there), not a checkpoint.
    hint = f"; if it was edited on purpose, delete {folder / MANIFEST}" if model_folder else ""
    raise CheckpointError(
        f"{folder / name}: SHA-256 mismatch (the file changed after it was saved; corrupted?)"
        + hint
    )


def _check_size(folder: Path, name: str, size: int) -> None:
    file = folder / name
    if not file.is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing")
    actual = file.stat().st_size
    if actual != size:
        raise CheckpointError(
            f"checkpoint {folder} is corrupt: {name} has {actual} bytes, the manifest says {size}"
        )


def publish_folder(tmp: Path, final: Path) -> None:
    """Make a fully written temporary folder ``final``, durably: fsync every file and folder
    below ``tmp``, then rename it into place (a crash leaves the old ``final`` or the new one,
    never a mix)."""
    _fsync_tree(tmp)
    _replace_dir(tmp, final)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final`` (moving an existing ``final`` aside first), then fsync the
    parent so the rename itself is durable."""
    if final.exists():
        old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    for sub in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_dir(sub)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
